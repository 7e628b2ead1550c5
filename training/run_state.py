"""The state of a training run between epochs, so an interrupted run can go on exactly.

After every epoch the trainer writes ``last.pt`` beside ``best.pt``: the model and
optimiser, the best epoch so far and its weights, the history, the patience count
and every random generator the next epoch draws from (NumPy's batch order,
torch's dropout). ``train(..., resume=True)`` loads it and runs the remaining
epochs; on one process, the same device and one CPU thread, the result is
bit-identical to a run that was never stopped (with two threads or more, torch's
parallel sums already differ between two unbroken runs of the same command on
large data: docs/speed.md). A run may be resumed with more
epochs, another patience or another thread count (then it goes on correctly but
not bit for bit: sums are added in another order); anything else that shapes the
result must match, or it is an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mqsa.errors import ResumeError
from mqsa.training.artifacts import save_torch_atomic
from mqsa.training.checkpoint import BestEpoch

RUN_STATE_FORMAT = 1
# TrainConfig fields a resumed run may change: they decide how long it runs or how fast, not what it learns.
MAY_CHANGE = frozenset({"epochs", "patience", "threads"})


@dataclass
class RunState:
    """Everything the epoch loop carries from one epoch to the next.

    Attributes:
        epoch: epochs finished.
        model: the model's state_dict after ``epoch``.
        optimizer: the optimiser's state_dict.
        best: the best epoch so far (stored as a dict).
        best_state: that epoch's state_dict.
        history: one row per finished epoch (``history.csv``).
        stale: evaluations since the best one (the patience count).
        train_seconds: seconds spent in training epochs so far, over all resumes.
        wall_seconds: seconds the run has taken so far, over all resumes.
        resumed_at: epochs after which the run was resumed, in order.
        numpy_rng: the batch-order generator's ``bit_generator.state``.
        torch_rng: torch's CPU generator state.
        cuda_rng: every CUDA generator's state, or None without CUDA.
        warm_start: what ``--init-from`` did (``training.warm_start``), None without it.
    """

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    best: BestEpoch
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    stale: int
    train_seconds: float
    wall_seconds: float
    resumed_at: list[int]
    numpy_rng: dict[str, Any]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    warm_start: dict[str, Any] | None = None


def capture_rng(rng: np.random.Generator) -> dict[str, Any]:
    """The generator states a RunState needs, as keyword arguments."""
    return {
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: RunState, rng: np.random.Generator) -> None:
    """Put every generator back where it was when ``state`` was captured."""
    rng.bit_generator.state = state.numpy_rng
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)


def save_run_state(path: Path, state: RunState, fingerprint: dict[str, Any]) -> None:
    """Write ``state`` atomically: a crash mid-write leaves the previous file whole."""
    payload = {"format": RUN_STATE_FORMAT, "fingerprint": fingerprint, **asdict(state)}
    payload["model"] = {k: v.cpu() for k, v in state.model.items()}
    payload["best_state"] = {k: v.cpu() for k, v in state.best_state.items()}
    save_torch_atomic(payload, path)


def load_run_state(
    path: Path, fingerprint: dict[str, Any], defaults: dict[str, dict[str, Any]] | None = None
) -> RunState:
    """Read ``path`` and check it belongs to a run with this ``fingerprint``.

    ``defaults`` (per section, setting -> default) fills in the settings a run state saved
    before they existed: such a run had the default, so a run resumed with it goes on.

    Raises:
        ResumeError: no file, not a run state, or a setting or the data differs
            (the message names each difference).
    """
    if not path.exists():
        raise ResumeError(f"{path}: nothing to resume (no run has finished an epoch in this folder)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise ResumeError(f"{path}: not a readable run state ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != RUN_STATE_FORMAT:
        raise ResumeError(f"{path}: not a run state of format {RUN_STATE_FORMAT}")
    saved = payload["fingerprint"]
    for section, values in (defaults or {}).items():  # a setting added since: the run had its default
        saved[section] = {**values, **saved.get(section, {})}
    differences = _differences(saved, fingerprint)
    if differences:
        raise ResumeError(f"{path}: cannot resume, the run differs: " + "; ".join(differences))
    del payload["format"], payload["fingerprint"]
    payload["best"] = BestEpoch(**payload["best"])
    return RunState(**payload)


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``section.key: saved -> now`` for every setting that must not change."""
    out = []
    for section in sorted(set(saved) | set(now)):
        old, new = saved.get(section, {}), now.get(section, {})
        for key in sorted(set(old) | set(new)):
            if section == "train_config" and key in MAY_CHANGE:
                continue
            if old.get(key) != new.get(key):
                out.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out
