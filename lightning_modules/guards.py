"""Training guards shared by the phase modules: finite losses and resumable randomness.

* :func:`check_finite` stops a run at the first NaN/inf loss term with a message naming every bad term,
  e.g. ``FloatingPointError: non-finite loss term(s) at step 12: losses/kl=nan``.
* :func:`check_phase` refuses a checkpoint written by the other phase, naming both kinds and the path.
* :func:`seeded_rng` runs a block (a training step's sampling) with the global torch RNG seeded from
  ``(seed, stream, rank, index)`` and restores the global state afterwards. A step's noise then depends on
  the step alone, not on how much randomness Lightning, the DataLoaders or validation drew before it, so a
  run resumed from a checkpoint draws the same noise as the uninterrupted run (and validation, drawing from
  its own stream, leaves the training noise untouched).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager, Iterator, Mapping

import torch

from envs.seeding import derive_seed

__all__ = ["PHASE_KEY", "check_finite", "check_phase", "derive_seed", "seeded_rng", "step_noise"]

PHASE_KEY = "phase"  # the checkpoint entry naming the phase that wrote it: "filter" or "cql"


def check_finite(terms: Mapping[str, torch.Tensor | float], step: int, batch: Any = None) -> None:
    """Raise ``FloatingPointError`` naming every non-finite (NaN or +-inf) entry of ``terms``, and, when ``batch``
    (a data batch [B, L]) is given and holds the cause, the input field, task, rollout and step it came from.

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
    cause = non_finite_input(batch) if batch is not None else None
    raise FloatingPointError(f"non-finite loss term(s) at step {step}: " + ", ".join(bad) + (f"; {cause}" if cause else ""))


def non_finite_input(batch: Any) -> str | None:
    """Where a data batch [B, L] holds its first NaN/inf: field, source task, rollout and step (None: nowhere)."""
    from envs.keys import ROLLOUT, STEP, TASK

    keys = set(batch.keys(include_nested=True, leaves_only=True))
    for key in sorted(keys, key=str):
        value = batch[key]
        if not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value.reshape(*value.shape[:2], -1)).all(-1)
        if bool(bad.any()):
            b, t = (int(i) for i in torch.nonzero(bad)[0])
            where = ", ".join(f"{name} {int(batch[k][b, t])}" for name, k in (("task", TASK), ("rollout", ROLLOUT),
                                                                               ("step", STEP)) if k in keys)
            return f"input {key} is non-finite at batch row {b}, position {t}" + (f" ({where})" if where else "")
    return None


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


def step_noise(module: Any, seed: int, stream: int, index: int, device: torch.device | str) -> ContextManager[None]:
    """:func:`seeded_rng` for (``seed``, ``stream``, the module's global rank, ``index``).

    A training step's noise then depends on (seed, rank, step) alone: a resumed run draws exactly the noise of the
    uninterrupted one, each DDP rank draws its own, and validation (its own stream) leaves training untouched.
    """
    trainer = getattr(module, "_trainer", None)
    rank = trainer.global_rank if trainer is not None else 0
    return seeded_rng(derive_seed(seed, stream, rank, index), device)


def checkpoint_phase(checkpoint: Mapping[str, Any]) -> str:
    """The phase that wrote a checkpoint: its :data:`PHASE_KEY`, else guessed from its weights (older files)."""
    if PHASE_KEY in checkpoint:
        return str(checkpoint[PHASE_KEY])
    state = checkpoint.get("state_dict") or {}
    return "cql" if any(k.startswith("loss_module.") for k in state) else "filter"


def check_phase(checkpoint: Mapping[str, Any], expected: str, who: str, path: Any = None) -> None:
    """``ValueError`` when ``checkpoint`` was written by another phase than ``expected`` (``who`` resumes it)."""
    found = checkpoint_phase(checkpoint)
    if found != expected:
        where = f" {str(path)!r}" if path else ""
        raise ValueError(f"checkpoint{where} was written by phase {found!r} ({PHASE_NAMES.get(found, found)}); "
                         f"{who} (phase {expected!r}) cannot resume or load it")


PHASE_NAMES = {"filter": "VariationalFilterModule", "cql": "LatentCQLModule"}
