"""Warm start: begin a run from an older checkpoint trained on another version of the data.

``mqsa train --init-from OLD/best.pt`` (``TrainConfig.init_from``). The catalogue of the
new data may have grown, shrunk and been renumbered, so item rows are matched by
external item id (the checkpoint's ``item_ids``, the data's vocabulary):

- an item the old model knows keeps its row, bit for bit, whatever its new index;
- a new item starts from the mean of the old rows of its transition neighbours in
  the new training split (the items it follows or precedes, in the transition graph
  the TED teacher uses), weighted by transition counts, counting only neighbours the
  old model knows;
- a new item without such a neighbour starts from the mean of all old item rows;
- an item the old model knows but the new data lacks is dropped.

Every other tensor (positions, attention, FFN, norms, a learned alpha) is copied as it
is; a tensor whose name or shape differs is refused with a ConfigError naming it. The
optimiser starts fresh (``best.pt`` holds no optimiser state).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mqsa.errors import ConfigError, DataError
from mqsa.models.mqsa import MQSA
from mqsa.training.checkpoint import Checkpoint
from mqsa.training.transitions import TransitionGraph

ITEM_TABLE = "item_emb.weight"


@dataclass
class WarmStartReport:
    """What a warm start did with each item (in ``metrics.json`` as ``warm_start``).

    Attributes:
        source: the checkpoint it started from.
        kept: items of the new data the old model knew (their rows copied).
        new_from_neighbours: new items initialised from their transition neighbours.
        new_from_mean: new items initialised from the mean old row.
        dropped: items the old model knew that the new data lacks.
    """

    source: str
    kept: int
    new_from_neighbours: int
    new_from_mean: int
    dropped: int

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def load_warm_start_checkpoint(path: str | Path) -> Checkpoint:
    """Read the checkpoint to warm-start from.

    Raises:
        DataError: a missing or unreadable file, not an MQSA checkpoint, or one without
            item ids (rows cannot be matched to the new data's items without them).
    """
    old = Checkpoint.load(path)
    if not old.item_ids:
        raise DataError("has no item ids (item_ids): its rows cannot be matched to the new items", path)
    rows = old.state_dict.get(ITEM_TABLE)
    if rows is None or rows.shape[0] != len(old.item_ids) + 1:
        shape = None if rows is None else tuple(rows.shape)
        raise DataError(f"{ITEM_TABLE} of shape {shape} does not fit its {len(old.item_ids)} item ids", path)
    return old


def check_architecture(model: MQSA, old: Checkpoint) -> None:
    """Refuse an old network whose tensors differ in name or shape from ``model``'s.

    The item table may differ in its number of rows (the catalogue), not in its width.

    Raises:
        ConfigError: naming the first differing tensor and both shapes.
    """
    new_state = model.state_dict()
    where = f"--init-from {old.path}" if old.path is not None else "the warm-start checkpoint"
    differing = [
        f"{key} {old.model_config.get(key)!r} -> {value!r}"
        for key, value in model.config.to_dict().items()
        if key != "num_items" and old.model_config.get(key) != value
    ]
    hint = f" (model settings that differ: {', '.join(differing)})" if differing else ""
    for name in sorted(set(new_state) | set(old.state_dict)):
        if name not in old.state_dict:
            raise ConfigError(f"{where}: another network: the checkpoint has no parameter {name!r}{hint}")
        if name not in new_state:
            raise ConfigError(f"{where}: another network: this one has no parameter {name!r}{hint}")
        new_shape, old_shape = tuple(new_state[name].shape), tuple(old.state_dict[name].shape)
        if new_shape[name == ITEM_TABLE :] != old_shape[name == ITEM_TABLE :]:  # the item table: width only
            raise ConfigError(
                f"{where}: another network: parameter {name!r} has shape {old_shape} in the "
                f"checkpoint, {new_shape} here{hint}"
            )


def neighbour_rows(
    graph: TransitionGraph, old_index: np.ndarray, old_rows: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """Count-weighted mean of the known neighbours' old rows, for every new item that has one.

    An edge i -> j of count c makes i a neighbour of j and j a neighbour of i, each with
    weight c; only neighbours the old model knows count, and only new items get a row.

    Args:
        graph: the new training split's transition graph over N new item indices.
        old_index: (N,) each new item's row in the old table, -1 for a new item.
        old_rows: (N_old, D) the old model's real item rows.

    Returns:
        rows (M, D) in ``old_rows``' dtype and the (M,) new item indices they belong to.
    """
    src = np.repeat(np.arange(graph.num_items), graph.row_lengths())  # (nnz,)
    items = np.concatenate([src, graph.indices])  # (2 nnz,) the item being initialised
    others = np.concatenate([graph.indices, src])  # (2 nnz,) its neighbour
    weights = np.concatenate([graph.counts, graph.counts]).astype(np.float64)
    use = (old_index[items] < 0) & (old_index[others] >= 0)
    items, others, weights = items[use], old_index[others[use]], weights[use]
    total = np.bincount(items, weights, minlength=graph.num_items)  # (N,)
    sums = torch.zeros(graph.num_items, old_rows.shape[1], dtype=torch.float64)  # (N, D)
    w = torch.from_numpy(weights).unsqueeze(1)  # (E, 1)
    sums.index_add_(0, torch.from_numpy(items), w * old_rows.double()[torch.from_numpy(others)])
    have = np.flatnonzero(total > 0)
    rows = sums[torch.from_numpy(have)] / torch.from_numpy(total[have]).unsqueeze(1)  # (M, D)
    return rows.to(old_rows.dtype), have


def item_table(
    old: Checkpoint, item_ids: list[str], graph: TransitionGraph
) -> tuple[torch.Tensor, WarmStartReport]:
    """The new item table (N + 1, D): old rows by id, new rows from neighbours or the mean.

    Args:
        old: the old checkpoint (with item ids).
        item_ids: (N,) the new data's external ids, in new index order.
        graph: the new training split's transition graph.

    Returns:
        The table (padding last) and the report of what each item got.
    """
    old_table = old.state_dict[ITEM_TABLE]  # (N_old + 1, D), padding last
    old_rows = old_table[: len(old.item_ids)]  # (N_old, D)
    position = {item_id: i for i, item_id in enumerate(old.item_ids)}
    old_index = np.array([position.get(item_id, -1) for item_id in item_ids], dtype=np.int64)  # (N,)
    known = np.flatnonzero(old_index >= 0)
    table = old_rows.mean(0).repeat(len(item_ids) + 1, 1)  # (N + 1, D) the mean row everywhere
    table[torch.from_numpy(known)] = old_rows[torch.from_numpy(old_index[known])]
    rows, have = neighbour_rows(graph, old_index, old_rows)
    table[torch.from_numpy(have)] = rows
    table[len(item_ids)] = 0.0  # the padding row (spec section 2)
    report = WarmStartReport(
        source=str(old.path),
        kept=len(known),
        new_from_neighbours=len(have),
        new_from_mean=len(item_ids) - len(known) - len(have),
        dropped=len(old.item_ids) - len(known),
    )
    return table, report


def warm_start(model: MQSA, old: Checkpoint, item_ids: list[str], graph: TransitionGraph) -> WarmStartReport:
    """Overwrite ``model``'s weights, in place, from the old checkpoint (module docstring).

    Args:
        model: the new network, N = ``len(item_ids)`` items.
        old: the old checkpoint (``load_warm_start_checkpoint``).
        item_ids: (N,) the new data's external item ids, in index order.
        graph: the new training split's transition graph (N x N).

    Returns:
        What each item got.

    Raises:
        ConfigError: the networks differ in a tensor other than the item table's row count.
    """
    check_architecture(model, old)
    table, report = item_table(old, item_ids, graph)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            source = table if name == ITEM_TABLE else old.state_dict[name]
            tensor.copy_(source.to(tensor.device, tensor.dtype))
    return report
