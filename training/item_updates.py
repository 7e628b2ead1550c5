"""Lazy updates of the item table: a step's optimizer cost that does not grow with the catalogue.

With the sampled loss a batch reads a few thousand rows of the item table (its items,
the shared negatives, TED's transitions), yet Adam updates every row in every step:
its moments decay and the L2 penalty's gradient l2 * w is nonzero on every row. At
10^6 items that dense pass, the dense gradient it needs and TED's sum over the table
were about 0.14 of an S3 step's 0.31 s (one thread; docs/scaling.md, "Lazy item
updates"). :class:`LazyItemAdam` updates only the rows the batch used, with
:class:`RowAdam` (the lazy Adam of torch's ``SparseAdam``, TensorFlow Addons and most
large-embedding recommenders), their L2 gradient added for those rows only; every
other parameter keeps the fused dense Adam. Rows a batch does not touch keep their
moments and get no L2 decay that step: a different optimisation from the paper's, the
sampled loss's default on one process (``TrainConfig.lazy_item_updates``) because it
matched the dense update on Beauty, came within 1% on Sports and beat it on S2
(docs/scaling.md); the exact loss keeps the paper's dense update.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mqsa.models.mqsa import MQSA


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows of a sparse gradient only: the other rows, and their moments, stay.

    The update of every row present is torch's ``Adam`` (its bias corrections and eps
    placement) with ``weight_decay``'s gradient l2 * w for that row; with every row
    present in every step it is ``Adam``. Written here rather than using
    ``torch.optim.SparseAdam`` (the same lazy update, eps placed slightly differently)
    because that one goes through sparse-dense additions: for the 11,700 rows of an S3
    step's gradient (a 10^6 x 64 table, one thread, coalesced) it took 31 ms against
    22 ms for gathering the rows, updating them and writing them back (a one-off timing
    on a loaded 2-core machine, where a lazy S3 step took ~0.17 s).

    Args:
        params: the tables (their gradients must be sparse).
        lr: the learning rate.
        betas: the moments' decays.
        eps: added to the second moment's root.
        weight_decay: the L2 penalty's weight (its gradient l2 * w, on the rows present).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        """One update of the rows in each table's gradient.

        Raises:
            RuntimeError: a table's gradient is dense (a loss term that reads the whole
                table; a bug, not a setting).
        """
        for group in self.param_groups:
            for table in group["params"]:
                if table.grad is not None:
                    self._update(table, group)

    def _update(self, table: torch.Tensor, group: dict[str, Any]) -> None:
        if not table.grad.is_sparse:
            raise RuntimeError("lazy item updates need a sparse item-table gradient, got a dense one")
        grad = table.grad.coalesce()  # one entry per row
        rows, values = grad.indices()[0], grad.values()  # (R,), (R, D)
        (beta1, beta2), l2 = group["betas"], group["weight_decay"]
        if l2:
            values = values + l2 * table.index_select(0, rows)
        state = self.state[table]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(table), exp_avg_sq=torch.zeros_like(table))
        state["step"] += 1
        first = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)  # (R, D)
        second = (
            state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
        )
        state["exp_avg"].index_copy_(0, rows, first)
        state["exp_avg_sq"].index_copy_(0, rows, second)
        correction1, correction2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = second.sqrt_().div_(math.sqrt(correction2)).add_(group["eps"])
        table.index_add_(0, rows, first.div_(denom), alpha=-group["lr"] / correction1)


class LazyItemAdam:
    """Fused Adam for the network, :class:`RowAdam` for the item table's rows a batch used.

    The trainer's optimizer interface: ``param_groups`` (both optimizers' groups, so a
    learning-rate schedule sets both), ``zero_grad``, ``step``, ``state_dict`` and
    ``load_state_dict``.

    Args:
        model: the network; its item table must get a sparse gradient
            (``use_sparse_item_gradients``) with nothing dense added to it.
        lr: the learning rate.
        betas: Adam's moment decays.
        l2: the L2 penalty's weight; its gradient l2 * w is added to the network's
            gradients and to the item rows a batch used (Adam's ``weight_decay``).
    """

    def __init__(self, model: MQSA, lr: float, betas: tuple[float, float], l2: float) -> None:
        table = model.item_table()
        rest = [p for p in model.parameters() if p is not table]
        self.network = torch.optim.Adam(rest, lr=lr, betas=betas, weight_decay=l2, fused=True)
        self.items = RowAdam([table], lr=lr, betas=betas, weight_decay=l2)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The network's groups, then the item table's: a learning rate set on each reaches both."""
        return self.network.param_groups + self.items.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Both optimizers' gradients cleared."""
        self.network.zero_grad(set_to_none=set_to_none)
        self.items.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One Adam step of the network and one lazy step of the item rows in the gradient."""
        self.items.step()
        self.network.step()

    def state_dict(self) -> dict[str, Any]:
        """``{"network": Adam's state, "items": RowAdam's}``."""
        return {"network": self.network.state_dict(), "items": self.items.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned."""
        self.network.load_state_dict(state["network"])
        self.items.load_state_dict(state["items"])
