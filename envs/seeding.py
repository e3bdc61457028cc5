"""Seed derivation, written once: independent random streams named by tuples of integers.

Every place that needs "the seed of rollout j of task i", "of batch g of stream s on rank r", "of episode e of
trial k" or "of training step n" mixes its integers with :func:`derive_seed`, so a stream depends on its name
alone (not on worker counts, batching or what was drawn before it) and runs resume exactly.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int, bits: int = 63) -> int:
    """A seed mixed from integers by ``numpy.random.SeedSequence``: 63 bits (default) or 32 (``bits=32``: env
    seeds, and the seeds of the collected datasets, which must stay what they were when the data was made)."""
    state = np.random.SeedSequence([int(p) for p in parts])
    if bits == 32:
        return int(state.generate_state(1)[0])
    if bits == 63:
        return int(state.generate_state(1, np.uint64)[0] >> 1)
    raise ValueError(f"bits must be 32 or 63, got {bits}")
