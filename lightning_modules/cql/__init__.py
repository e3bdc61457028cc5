"""Phase 2: latent CQL (paper section 3.7) on the frozen belief filter's beliefs."""

from lightning_modules.cql.module import LatentCQLModule

__all__ = ["LatentCQLModule"]
