"""Lightning modules (models and training phases) and the ``lightning`` command-line entry point."""
