"""MQSA-TED: Multi-Query Self-Attention (Zhu et al., WSDM 2024).

One file, top to bottom: the config, the window mean that builds the long
queries, one attention block, one branch (a stack of blocks), the model.
The spec this implements is ``shared/spec/mqsa-ted.md`` sections 1-4.

Shapes: B batch, T sequence slots (left-padded, most recent item at the last
slot), D hidden size, H heads, N real items, P real positions, K item
occurrences. Item indices are 0..N-1; the padding index is N, the last row of
the item table, fixed at zero.

The model takes tensors only; padding arrays, numpy and files belong to the
code in ``training/``. It exposes what the losses in ``training/losses.py``
need (:meth:`MQSA.real_position_queries`, :meth:`MQSA.student_vectors`,
:meth:`MQSA.item_embeddings`), so they never reach into its submodules.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mqsa.errors import ConfigError


@dataclass
class MQSAConfig:
    """Everything needed to rebuild the network; saved inside every checkpoint.

    The defaults are the paper's (spec section 7). ``mqsa train`` makes one flag
    per field but ``num_items`` (which comes from the data), with the text below
    as its help, and the README's settings table is checked against it.

    Attributes:
        num_items: N, the number of real items. The padding index is N.
        max_len: T, the sequence slots (and position embeddings).
        hidden_size: d, the embedding size.
        num_blocks: attention blocks per branch.
        num_heads: attention heads per block (must divide hidden_size).
        dropout: dropout rate of the embeddings, attention weights and FFN.
        windows: L of each long-query branch; several values give several long
            branches, whose outputs are averaged.
        alpha: weight of the short branch in the blend (1 = SASRec).
        learn_alpha: learn alpha (a sigmoid of a scalar) instead of fixing it.
        window_decay: a window item k steps back weighs decay**k (1 = the paper's
            plain mean).
        linear_init: initialisation of the attention and FFN layers, which the spec
            leaves open: torch (PyTorch's default) or glorot (Glorot weights and
            zero biases, as the authors' TensorFlow code).
    """

    num_items: int
    max_len: int = 50
    hidden_size: int = 64
    num_blocks: int = 1
    num_heads: int = 1
    dropout: float = 0.5
    windows: tuple[int, ...] = field(default=(3,))
    alpha: float = 0.5
    learn_alpha: bool = False
    window_decay: float = 1.0
    linear_init: Literal["torch", "glorot"] = "torch"

    def __post_init__(self) -> None:
        self.windows = tuple(int(w) for w in self.windows)
        for name in ("num_items", "max_len", "hidden_size", "num_blocks", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not self.windows or any(w < 1 for w in self.windows):
            raise ConfigError(f"windows must be a non-empty tuple of L >= 1, got {self.windows}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.learn_alpha and not 0.0 < self.alpha < 1.0:
            raise ConfigError("a learned alpha must start strictly between 0 and 1")
        if not 0.0 < self.window_decay <= 1.0:
            raise ConfigError(f"window_decay must be in (0, 1], got {self.window_decay}")
        if self.linear_init not in ("torch", "glorot"):
            raise ConfigError(f"linear_init must be 'torch' or 'glorot', got {self.linear_init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padding_idx(self) -> int:
        return self.num_items

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = list(self.windows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MQSAConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown MQSAConfig fields: {sorted(unknown)}")
        return cls(**d)


def window_mean(h: torch.Tensor, mask: torch.Tensor, window: int, decay: float = 1.0) -> torch.Tensor:
    """Mean of ``h`` over the last ``window`` slots up to each position, real items only.

    A static loop over the window offsets (no data-dependent control flow), so it
    exports to ONNX. With ``decay`` < 1 the item k steps back weighs ``decay**k``.

    Args:
        h: (B, T, D) hidden states, zero at padding.
        mask: (B, T, 1) 1.0 at real items, 0.0 at padding.
        window: L >= 1.
        decay: weight ratio between consecutive window offsets.

    Returns:
        (B, T, D) windowed mean; zero where the window holds no real item.
    """
    masked = h * mask  # (B, T, D)
    total, count = masked, mask
    for k in range(1, window):
        w = decay**k
        shifted_h = F.pad(masked, (0, 0, k, 0))[:, :-k]  # (B, T, D): slot t holds t-k
        shifted_m = F.pad(mask, (0, 0, k, 0))[:, :-k]  # (B, T, 1)
        total = total + w * shifted_h
        count = count + w * shifted_m
    return total / count.clamp_min(1e-12)


class Dropout(nn.Module):
    """Inverted dropout that draws one random byte per element on CPU.

    On the 2-core CPUs we train on, torch's Bernoulli sampler costs more than the
    attention itself; bytes are about 4x cheaper. The rate is rounded to a
    multiple of 1/256 (0.5 stays exact). On other devices it is ``F.dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        draw = torch.randint(0, 256, x.shape, dtype=torch.uint8, device=x.device)  # same shape as x
        keep = (draw >= self.threshold).to(x.dtype)
        return x * keep * (256.0 / (256 - self.threshold))


class Block(nn.Module):
    """One self-attention block: attention from ``q_in`` over ``h``, then a point-wise FFN."""

    def __init__(self, cfg: MQSAConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.query_norm = nn.LayerNorm(d, eps=1e-8)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_dropout = Dropout(cfg.dropout)
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(d, d),
            nn.ReLU(),
            Dropout(cfg.dropout),
            nn.Linear(d, d),
            Dropout(cfg.dropout),
        )

    def forward(
        self, h: torch.Tensor, q_in: torch.Tensor, mask: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            h: (B, T, D) hidden states (keys and values come from here).
            q_in: (B, T, D) query input: ``h`` (short branch) or its window mean (long).
            mask: (B, T, 1) 1.0 at real items.
            allowed: (B, 1, T, T) bool, True where query t may attend to key s
                (s <= t and s is a real item).

        Returns:
            (B, T, D) new hidden states, zero at padding.
        """
        B, T, D = h.shape
        H, Dh = self.num_heads, self.head_dim
        qn = self.query_norm(q_in)  # (B, T, D)
        q = self.query(qn).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.key(h).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        v = self.value(h).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(Dh)  # (B, H, T, T)
        scores = scores.masked_fill(~allowed, -1e9)
        weights = torch.softmax(scores, dim=-1) * mask.unsqueeze(1)  # padded query rows -> 0
        weights = self.attn_dropout(weights)
        attn = (weights @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        o = self.attn_norm(attn + qn)  # residual from the normalised query
        o = o + self.ffn(o)
        return o * mask


class Branch(nn.Module):
    """A stack of blocks; short-query when ``window`` is None, else long-query with that L."""

    def __init__(self, cfg: MQSAConfig, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.decay = cfg.window_decay
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=1e-8)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(B, T, D) embedded input -> (B, T, D) output per position."""
        for block in self.blocks:
            q_in = h if self.window is None else window_mean(h, mask, self.window, self.decay)
            h = block(h, q_in, mask, allowed)
        return self.final_norm(h)


class MQSA(nn.Module):
    """The MQSA network: shared embeddings, a short-query branch, long-query branch(es)."""

    def __init__(self, cfg: MQSAConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(cfg.num_items + 1, d, padding_idx=cfg.padding_idx)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_dropout = Dropout(cfg.dropout)
        self.short = Branch(cfg, window=None)
        self.longs = nn.ModuleList(Branch(cfg, window=w) for w in cfg.windows)
        if cfg.learn_alpha:
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(cfg.alpha / (1 - cfg.alpha))))
        # (1,) the padding index, on the model's device (item_total reads it every step;
        # made there each time it would be a host-to-device copy); not saved with the weights.
        self.register_buffer("pad_index", torch.tensor([cfg.padding_idx]), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.item_emb.weight, std=0.01)
        nn.init.normal_(self.pos_emb.weight, std=0.01)
        if self.config.linear_init == "glorot":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_emb.weight[self.config.padding_idx].zero_()

    @property
    def alpha(self) -> torch.Tensor:
        """The blend weight of the short branch, a scalar tensor."""
        if self.config.learn_alpha:
            return torch.sigmoid(self.alpha_logit)
        return torch.tensor(self.config.alpha)

    def item_embeddings(self) -> torch.Tensor:
        """(N, D) the real items' embeddings (the padding row left out): the table scores use."""
        return self.item_emb.weight[: self.config.num_items]

    def item_rows(self, item_idx: torch.Tensor) -> torch.Tensor:
        """(...) item indices -> (..., D) their rows of the item table, unscaled; with sparse
        item gradients on (:meth:`use_sparse_item_gradients`) only the rows used get a
        gradient (for losses that touch a few items of a large catalogue, where
        ``item_embeddings()[idx]`` gives every call an (N, D) gradient)."""
        return F.embedding(item_idx, self.item_emb.weight, sparse=self.item_emb.sparse)

    def item_total(self) -> torch.Tensor:
        """(D,) sum_j E_j over the real items. Summed over the whole table less the padding
        row (read through :meth:`item_rows`), so its gradient reaches the table as one
        broadcast instead of through the slice ``item_embeddings()``, whose backward pass
        zero-fills and copies an (N + 1, D) tensor (0.15 s a step at 10^6 items)."""
        return self.item_emb.weight.sum(0) - self.item_rows(self.pad_index)[0]

    def item_table(self) -> nn.Parameter:
        """(N + 1, D) the item table as a parameter, padding row included: for an optimizer
        that updates it apart from the rest of the network (``training.item_updates``)."""
        return self.item_emb.weight

    def use_sparse_item_gradients(self, enabled: bool = True) -> None:
        """Give the item lookups (the input layer's and :meth:`item_rows`) a sparse gradient,
        the rows used, instead of a dense (N, D) one per call. The optimizer then needs the
        table's summed gradient made dense where nothing dense was added to it."""
        self.item_emb.sparse = enabled

    def embed_items(self, item_idx: torch.Tensor) -> torch.Tensor:
        """(...) item indices -> (..., D) embeddings scaled by sqrt(D), as the input layer scales them."""
        return self.item_emb(item_idx) * math.sqrt(self.config.hidden_size)

    def student_vectors(self, item_idx: torch.Tensor) -> torch.Tensor:
        """(K,) item indices -> (K, D) dropout(E_i * sqrt(D)): TED's student queries (spec 6.3)."""
        return self.emb_dropout(self.embed_items(item_idx))

    def forward(self, item_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run both branches over left-padded sequences.

        Args:
            item_idx: (B, T') int64 with T' <= max_len, left-padded with the
                padding index. Slots are right-aligned to the position table, so
                trimming common left padding changes no output.

        Returns:
            short, long: (B, T', D) each; ``long`` averages the long branches.
        """
        T = item_idx.shape[1]
        cfg = self.config
        mask = (item_idx != cfg.padding_idx).unsqueeze(-1).to(self.item_emb.weight.dtype)  # (B, T, 1)
        positions = torch.arange(cfg.max_len - T, cfg.max_len, device=item_idx.device)  # (T,)
        h = self.embed_items(item_idx) + self.pos_emb(positions)  # (B, T, D)
        h = self.emb_dropout(h) * mask
        causal = torch.ones(T, T, dtype=torch.bool, device=item_idx.device).tril()  # (T, T)
        allowed = causal & (mask.squeeze(-1) > 0).unsqueeze(1)  # (B, T, T): key s real and s <= t
        allowed = allowed.unsqueeze(1)  # (B, 1, T, T)
        short = self.short(h, mask, allowed)  # (B, T, D)
        long = torch.stack([b(h, mask, allowed) for b in self.longs]).mean(0)  # (B, T, D)
        return short, long

    def encode(self, item_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last slot's vectors, the serving path: (B, T') -> short (B, D), long (B, D)."""
        short, long = self(item_idx)
        return short[:, -1], long[:, -1]

    def blend(self, short: torch.Tensor, long: torch.Tensor) -> torch.Tensor:
        """z = alpha * short + (1 - alpha) * long, any matching shapes (..., D)."""
        alpha = self.alpha.to(short.dtype)
        return alpha * short + (1 - alpha) * long

    def real_position_queries(
        self, item_idx: torch.Tensor, targets: torch.Tensor, min_width: int = 4
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blended vector z_t and its target at every slot whose target is a real item.

        Rows are grouped by length into widths 4, 8, 16, ... and each group runs
        trimmed to its width (the last to its longest row): most sequences are
        short, and a batch padded to its longest row would spend most of the
        network's work on padding. Rows are independent and slots right-aligned,
        so this is exact; it is the only place a training batch is trimmed.

        Args:
            item_idx: (B, T') left-padded input items.
            targets: (B, T') the next item at each slot, padding where none.

        Returns:
            z (P, D) and the (P,) target items, P = slots with a real target.
        """
        pad = self.config.padding_idx
        lengths = (item_idx != pad).sum(1)  # (B,)
        width = int(lengths.max())
        zs, ts = [], []
        low = 0
        while low < width:
            high = min(max(min_width, 2 * low), width)
            rows = ((lengths > low) & (lengths <= high)).nonzero().squeeze(1)
            low = high
            if rows.numel() == 0:
                continue
            group, group_targets = item_idx[rows, -high:], targets[rows, -high:]  # (b, w)
            short, long = self(group)  # (b, w, D) each
            real = group_targets != pad  # (b, w)
            zs.append(self.blend(short[real], long[real]))
            ts.append(group_targets[real])
        if sum(len(t) for t in ts) == 0:
            raise ValueError("the batch has no real position with a target (every row is padding)")
        return torch.cat(zs), torch.cat(ts)
