"""Online meta-evaluation: the protocol (:mod:`.protocol`), the lockstep trial runner (:mod:`.runner`) and the
results, scalars and figures (:mod:`.results`). The training-time callback is
:mod:`lightning_modules.callbacks.meta_rollout_evaluation`; the command line is :mod:`lightning_modules.evaluate`."""
