"""Lightning callbacks chosen in the configs (by full class path, so that importing one loads no other):

* :class:`lightning_modules.callbacks.meta_rollout_evaluation.MetaRolloutEvaluation`: online rollouts (phase 2).
* :class:`lightning_modules.callbacks.filter_images.FilterImageLogger`: the filter's images (phase 1, pixels).
"""
