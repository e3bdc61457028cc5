"""Training guards shared by the phase modules: finite losses and resumable randomness.

* :func:`check_finite` stops a run at the first NaN/inf loss term with a message naming every bad term,
  e.g. ``FloatingPointError: non-finite loss term(s) at step 12: losses/kl=nan``.
* :func:`seeded_rng` runs a block (a training step's sampling) with the global torch RNG seeded from
  ``(seed, stream, rank, index)`` and restores the global state afterwards. A step's noise then depends on
  the step alone, not on how much randomness Lightning, the DataLoaders or validation drew before it, so a
  run resumed from a checkpoint draws the same noise as the uninterrupted run (and validation, drawing from
  its own stream, leaves the training noise untouched).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import numpy as np
import torch

__all__ = ["check_finite", "seeded_rng", "derive_seed"]


def check_finite(terms: Mapping[str, torch.Tensor | float], step: int) -> None:
    """Raise ``FloatingPointError`` naming every non-finite (NaN or +-inf) entry of ``terms``.

    One device synchronisation in the usual (all finite) case: the scalars are stacked and checked at once.
    Non-scalar tensors count as non-finite when any element is.
    """
    if not terms:
        return
    values = [torch.as_tensor(v).detach() for v in terms.values()]
    device = values[0].device
    flags = torch.stack([torch.isfinite(v.float()).all().to(device) for v in values])
    if bool(flags.all()):
        return
    bad = []
    for (name, value), ok in zip(terms.items(), flags.tolist()):
        if not ok:
            v = torch.as_tensor(value).detach().float()
            shown = v.item() if v.numel() == 1 else f"{(~torch.isfinite(v)).sum().item()} of {v.numel()} non-finite"
            if isinstance(shown, float) and math.isnan(shown):
                shown = "nan"
            bad.append(f"{name}={shown}")
    raise FloatingPointError(f"non-finite loss term(s) at step {step}: " + ", ".join(bad))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (``numpy.random.SeedSequence``; independent streams per tuple)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed the global CPU RNG (and ``device``'s, when it is an accelerator) inside the block; restore after."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    accel = device.type != "cpu"
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    with torch.random.fork_rng(devices=[index] if accel else [], device_type=device.type if accel else "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        elif accel:
            torch.manual_seed(seed)  # other accelerators: their default generators
        yield
