"""Lazy updates of the item table: a step's optimizer cost that does not grow with the catalogue.

With the sampled loss a batch reads a few thousand rows of the item table (its items,
the shared negatives, TED's transitions), yet Adam updates every row in every step:
its moments decay and the L2 penalty's gradient l2 * w is nonzero on every row. At
10^6 items that dense pass (with the dense gradient it needs) is most of an S3 step
(docs/scaling.md). :class:`LazyItemAdam` updates only the rows the batch used, with
torch's ``SparseAdam`` (the lazy Adam of TensorFlow Addons and of most large-embedding
recommenders), and their L2 gradient added for those rows only; every other parameter
keeps the fused dense Adam. Rows a batch does not touch keep their moments and get no
L2 decay that step: a different optimisation from the paper's, so it is an option
(``TrainConfig.lazy_item_updates``) whose accuracy docs/scaling.md reports.
"""

from __future__ import annotations

from typing import Any

import torch

from mqsa.models.mqsa import MQSA


class LazyItemAdam:
    """Fused Adam for the network, ``SparseAdam`` for the item table's rows a batch used.

    The trainer's optimizer interface: ``param_groups`` (both optimizers' groups, so a
    learning-rate schedule sets both), ``zero_grad``, ``step``, ``state_dict`` and
    ``load_state_dict``.

    Args:
        model: the network; its item table must get a sparse gradient
            (``use_sparse_item_gradients``) with nothing dense added to it.
        lr: the learning rate.
        betas: Adam's moment decays.
        l2: the L2 penalty's weight; its gradient l2 * w is added to the network's
            gradients (Adam's ``weight_decay``) and to the item rows a batch used.
    """

    def __init__(self, model: MQSA, lr: float, betas: tuple[float, float], l2: float) -> None:
        self.table = model.item_table()
        rest = [p for p in model.parameters() if p is not self.table]
        self.network = torch.optim.Adam(rest, lr=lr, betas=betas, weight_decay=l2, fused=True)
        self.items = torch.optim.SparseAdam([self.table], lr=lr, betas=betas)
        self.l2 = l2

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.network.param_groups + self.items.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.network.zero_grad(set_to_none=set_to_none)
        self.items.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One Adam step of the network and one lazy step of the item rows in the gradient.

        Raises:
            RuntimeError: the item table's gradient is dense (a loss term that reads the
                whole table; a bug, not a setting).
        """
        grad = self.table.grad
        if grad is not None:
            if not grad.is_sparse:
                raise RuntimeError("lazy item updates need a sparse item-table gradient, got a dense one")
            grad = grad.coalesce()  # one entry per row: the L2 term is added once
            if self.l2:
                rows = grad.indices()[0]  # (R,)
                values = grad.values() + self.l2 * self.table.detach()[rows]  # (R, D)
                grad = torch.sparse_coo_tensor(
                    grad.indices(), values, grad.shape, is_coalesced=True, check_invariants=False
                )  # the indices are the coalesced gradient's own
            self.table.grad = grad
        self.items.step()
        self.network.step()

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.network.state_dict(), "items": self.items.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.items.load_state_dict(state["items"])
