"""Data pipeline: synthetic-exploration meta-rollouts (paper section 3.5) served as TensorDict batches [B, L]."""

from datamodules.datamodule import MetaExplorationDataModule, StreamLoader, check_dataset
from datamodules.meta_exploration import (
    MODES,
    MetaExplorationSampler,
    MetaExplorationStream,
    SampleIndices,
    SamplerConfig,
    StreamProgress,
    batch_generator,
)

__all__ = [
    "MODES",
    "MetaExplorationDataModule",
    "MetaExplorationSampler",
    "MetaExplorationStream",
    "SampleIndices",
    "SamplerConfig",
    "StreamLoader",
    "StreamProgress",
    "batch_generator",
    "check_dataset",
]
