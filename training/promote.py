"""The quality gate: a candidate bundle serves only if it does at least as well as the serving one.

``mqsa promote CANDIDATE --bundles ROOT --holdout LOG --holdout-since T`` scores the
candidate and the version serving now (``ROOT/current``) on the same recent holdout
(``training/holdout.py``), beside Popularity and Item Transition, and promotes the
candidate (``service/versions.py``: copied to ``versions/``, ``current`` switched
atomically, old versions pruned) only when, on the gate metric:

* candidate >= serving * (1 - tolerance): the tolerance is relative (0.01: the
  candidate may be up to 1% below the serving model, which absorbs the noise of a
  small holdout; 0 asks for no loss at all); and
* candidate > Popularity and candidate > Item Transition, strictly.

With nothing serving yet, only the baselines count. Whatever the outcome, a report
(both models' and the baselines' metrics, the event counts, the gate and its reasons)
is written beside the candidate (``<CANDIDATE>.promotion.json``) and an entry goes to
``ROOT/history.json``. A refusal leaves ``current`` as it was.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mqsa.errors import ConfigError
from mqsa.service import versions
from mqsa.service.bundle import verify_bundle
from mqsa.training.holdout import evaluate_holdout, load_scorer, read_holdout
from mqsa.training.report import METRIC_COLUMNS

BASELINES = ("Popularity", "ItemTransition")


@dataclass
class Gate:
    """What a candidate must reach. ``mqsa promote`` makes one flag per field.

    Attributes:
        metric: the metric compared (HR@K or NDCG@K, K in 5, 10, 20; any case).
        tolerance: how far below the serving model the candidate may be, relative
            (0.01 = 1%); it must still beat both baselines outright.
        keep: versions kept under ROOT/versions (at least 2: the current one and the
            one a rollback returns to).
    """

    metric: str = "NDCG@10"
    tolerance: float = 0.01
    keep: int = 5

    def __post_init__(self) -> None:
        names = {c.lower(): c for c in METRIC_COLUMNS}
        if self.metric.lower() not in names:
            raise ConfigError(f"metric must be one of {', '.join(METRIC_COLUMNS)}, got {self.metric!r}")
        self.metric = names[self.metric.lower()]
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.keep < versions.MIN_KEEP:
            raise ConfigError(f"keep must be at least {versions.MIN_KEEP}, got {self.keep}")


@dataclass
class Outcome:
    """What ``promote`` decided.

    Attributes:
        promoted: whether ``current`` now names the candidate.
        candidate: the candidate's model version.
        serving: the version serving before (None: nothing was).
        reasons: why it was refused (empty when promoted).
        report: the report written beside the candidate.
        report_path: where.
        removed: versions pruned after the promotion.
    """

    promoted: bool
    candidate: str
    serving: str | None
    reasons: list[str]
    report: dict[str, Any]
    report_path: Path
    removed: list[str] = field(default_factory=list)


def decide(result: dict[str, Any], gate: Gate, has_serving: bool) -> list[str]:
    """The reasons to refuse (none: promote), from ``evaluate_holdout``'s result."""
    if result["holdout"]["scored"] == 0:
        return ["no holdout event could be scored (no user has an earlier item both models know)"]
    m = gate.metric
    cand = result["models"]["candidate"]["metrics"][m]
    reasons = []
    if has_serving:
        serving = result["models"]["serving"]["metrics"][m]
        floor = serving * (1.0 - gate.tolerance)
        if cand < floor:
            reasons.append(
                f"candidate {m} {cand:.4f} < serving {serving:.4f} x (1 - {gate.tolerance:g}) = {floor:.4f}"
            )
    for name in BASELINES:
        base = result["baselines"][name]["metrics"][m]
        if not cand > base:
            reasons.append(f"candidate {m} {cand:.4f} does not beat {name} {base:.4f}")
    return reasons


def promote(
    candidate: str | Path,
    root: str | Path,
    log: str | Path,
    since: str,
    gate: Gate | None = None,
    context: str | None = None,
) -> Outcome:
    """Score the candidate against the serving version and the baselines; switch only if it passes.

    Raises:
        DataError: a missing root, log or cut that leaves no events; another promote running.
        BundleError: the candidate (or the serving version) is not a usable bundle.
        ConfigError: a bad ``--holdout-since``.
    """
    gate = gate or Gate()
    hmac_key = os.environ.get("MQSA_BUNDLE_HMAC_KEY") or None
    candidate = Path(candidate)
    root = versions.open_root(root)
    with versions.locked(root):
        version = str(verify_bundle(candidate, hmac_key)["model_version"])
        serving = versions.current_version(root)
        if serving == version:
            raise ConfigError(f"{candidate} is version {version}, which is already serving")
        holdout = read_holdout(log, since, context)
        scorers = [load_scorer(candidate, "candidate")]
        if serving is not None:
            scorers.append(load_scorer(versions.version_dir(root, serving), "serving"))
        result = evaluate_holdout(holdout, scorers)
        result["holdout"]["log"] = str(log)
        reasons = decide(result, gate, serving is not None)
        if not reasons:
            versions.add_version(root, candidate, hmac_key)
            versions.switch(root, version)
        outcome = Outcome(not reasons, version, serving, reasons, result, report_path(candidate))
        outcome.report = {**result, "gate": asdict(gate), "decision": _decision(outcome)}
        versions.write_json_atomic(outcome.report_path, outcome.report)
        _record(root, outcome, gate)
        if outcome.promoted:
            outcome.removed = versions.prune(root, gate.keep)
    return outcome


def report_path(candidate: Path) -> Path:
    """Where the report goes: beside the candidate directory."""
    return candidate.absolute().parent / f"{candidate.absolute().name}.promotion.json"


def _decision(outcome: Outcome) -> dict[str, Any]:
    return {
        "promoted": outcome.promoted,
        "candidate": outcome.candidate,
        "serving": outcome.serving,
        "reasons": outcome.reasons,
        "time": versions.now(),
    }


def _record(root: Path, outcome: Outcome, gate: Gate) -> None:
    """One history entry with the gate metric of each side."""
    m = gate.metric
    scores = {
        name: entry["metrics"].get(m)
        for group in ("models", "baselines")
        for name, entry in outcome.report[group].items()
    }
    action = "promote" if outcome.promoted else "refuse"
    details = {"from": outcome.serving, "metric": m, "scores": scores, "report": str(outcome.report_path)}
    if not outcome.promoted:
        details["reasons"] = outcome.reasons
    versions.record(root, action, outcome.candidate, **details)
