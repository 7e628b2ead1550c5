from __future__ import annotations

import math

import pytest
import torch

from mqsa.errors import ConfigError
from mqsa.models.mqsa import MQSA, Dropout, MQSAConfig, window_mean

N_ITEMS = 13
PAD = N_ITEMS


def tiny_config(**overrides) -> MQSAConfig:
    """A small config; dropout stays on (0.5) so eval-mode tests prove it is switched off."""
    base = {"num_items": N_ITEMS, "max_len": 20, "hidden_size": 8, "num_blocks": 2, "num_heads": 2}
    base.update(overrides)
    return MQSAConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> MQSA:
    """An eval-mode model whose weights are large enough that every input visibly matters."""
    torch.manual_seed(seed)
    model = MQSA(tiny_config(**overrides))
    with torch.no_grad():
        model.item_emb.weight.normal_(0.0, 0.5)
        model.item_emb.weight[PAD].zero_()
        model.pos_emb.weight.normal_(0.0, 0.5)
    return model.eval()


def left_padded(lengths: list[int], width: int, seed: int = 0) -> torch.Tensor:
    """(len(lengths), width) random items, row b left-padded to hold lengths[b] real items."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((len(lengths), width), PAD, dtype=torch.int64)
    for b, n in enumerate(lengths):
        out[b, width - n :] = torch.randint(0, N_ITEMS, (n,), generator=g)
    return out


# ---------------------------------------------------------------- causality and padding


def test_outputs_are_causal() -> None:
    """Changing the real item at slot t leaves every slot < t untouched and changes slot t."""
    model = tiny_model()
    width = 8
    base = left_padded([8, 5, 3], width)
    # One batch: the base rows, then for every real slot (b, t) a copy of row b with slot t changed.
    variants = [(b, t) for b in range(base.shape[0]) for t in range(width) if base[b, t] != PAD]
    changed = base[[b for b, _ in variants]].clone()
    for row, (b, t) in enumerate(variants):
        changed[row, t] = (base[b, t] + 1) % N_ITEMS
    with torch.no_grad():
        short, long = model(torch.cat([base, changed]))
        short_alone, _ = model(base[:1])
    torch.testing.assert_close(short[:1], short_alone, atol=1e-6, rtol=0)  # rows do not interact
    n = base.shape[0]
    for row, (b, t) in enumerate(variants):
        s0, s1, l0, l1 = short[b], short[n + row], long[b], long[n + row]
        torch.testing.assert_close(s1[:t], s0[:t], atol=1e-6, rtol=0)
        torch.testing.assert_close(l1[:t], l0[:t], atol=1e-6, rtol=0)
        assert (s1[t] - s0[t]).abs().max() > 1e-3
        assert (l1[t] - l0[t]).abs().max() > 1e-3


def test_extra_left_padding_changes_nothing() -> None:
    model = tiny_model()
    narrow = left_padded([8, 5, 1], 8)
    wide = torch.cat([torch.full((3, 12), PAD, dtype=torch.int64), narrow], dim=1)  # width 20 = max_len
    with torch.no_grad():
        short_n, long_n = model(narrow)
        short_w, long_w = model(wide)
        enc_n = model.encode(narrow)
        enc_w = model.encode(wide)
    assert short_w.shape == (3, 20, 8)
    real = narrow != PAD
    torch.testing.assert_close(short_w[:, 12:][real], short_n[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(long_w[:, 12:][real], long_n[real], atol=1e-5, rtol=0)
    for a, b in zip(enc_n, enc_w, strict=True):
        assert a.shape == (3, 8)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc_n[0], short_n[:, -1])
    torch.testing.assert_close(enc_n[1], long_n[:, -1])


def test_positions_are_right_aligned() -> None:
    """The last slot always uses the last position row, whatever the input width."""
    model = tiny_model()
    x = left_padded([2], 2)
    with torch.no_grad():
        before = model.encode(x)[0]
        model.pos_emb.weight[: model.config.max_len - 2].normal_()  # rows the width-2 input never uses
        same = model.encode(x)[0]
        model.pos_emb.weight[-1].normal_()
        moved = model.encode(x)[0]
    torch.testing.assert_close(same, before, atol=0, rtol=0)
    assert (moved - before).abs().max() > 1e-3


def test_all_padding_input_is_finite() -> None:
    model = tiny_model()
    x = torch.full((2, 6), PAD, dtype=torch.int64)
    short, long = model(x)
    assert torch.isfinite(short).all() and torch.isfinite(long).all()
    model.train()
    short, long = model(x)
    assert torch.isfinite(short).all() and torch.isfinite(long).all()


# ---------------------------------------------------------------- window mean


def ramp() -> tuple[torch.Tensor, torch.Tensor]:
    """h = [99, 99, 2, 4, 6] (the 99s are at padding and must be ignored), mask = [0, 0, 1, 1, 1]."""
    h = torch.tensor([99.0, 99.0, 2.0, 4.0, 6.0]).view(1, 5, 1)
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]).view(1, 5, 1)
    return h, mask


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        (1, [0.0, 0.0, 2.0, 4.0, 6.0]),
        (2, [0.0, 0.0, 2.0, 3.0, 5.0]),
        (3, [0.0, 0.0, 2.0, 3.0, 4.0]),
        (4, [0.0, 0.0, 2.0, 3.0, 4.0]),
        (9, [0.0, 0.0, 2.0, 3.0, 4.0]),  # longer than the sequence
    ],
)
def test_window_mean_plain(window: int, expected: list[float]) -> None:
    h, mask = ramp()
    out = window_mean(h, mask, window)
    assert out.shape == (1, 5, 1)
    assert out.flatten().tolist() == pytest.approx(expected, abs=1e-6)


def test_window_mean_decay() -> None:
    h, mask = ramp()
    out = window_mean(h, mask, 3, decay=0.5).flatten().tolist()
    expected = [0.0, 0.0, 2.0, (4 + 0.5 * 2) / 1.5, (6 + 0.5 * 4 + 0.25 * 2) / 1.75]
    assert out == pytest.approx(expected, abs=1e-6)


def test_window_mean_rows_and_features_are_independent() -> None:
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]).view(2, 4, 1)
    out = window_mean(h, mask, 2)
    torch.testing.assert_close(out[0, 1:], (h[0, 1:] + h[0, :-1]) / 2)
    torch.testing.assert_close(out[0, 0], h[0, 0])
    torch.testing.assert_close(out[1, 3], h[1, 3])
    assert out[1, :3].abs().max() == 0


def test_window_one_is_identity_at_real_slots() -> None:
    torch.manual_seed(0)
    h = torch.randn(3, 6, 4)
    mask = (left_padded([6, 2, 4], 6) != PAD).float().unsqueeze(-1)
    out = window_mean(h * mask, mask, 1)
    torch.testing.assert_close(out, h * mask, atol=0, rtol=0)


def test_window_one_long_branch_equals_short_branch() -> None:
    """L = 1 makes the long branch the short one: same weights give the same outputs."""
    model = tiny_model(windows=(1,))
    model.longs[0].load_state_dict(model.short.state_dict())
    x = left_padded([8, 4, 1], 8)
    with torch.no_grad():
        short, long = model(x)
    torch.testing.assert_close(long, short, atol=1e-6, rtol=0)
    # The same copy with L = 3 does differ, so the comparison above can fail.
    model3 = tiny_model(windows=(3,))
    model3.longs[0].load_state_dict(model3.short.state_dict())
    with torch.no_grad():
        short3, long3 = model3(x)
    assert (long3 - short3).abs().max() > 1e-3


# ---------------------------------------------------------------- blend, alpha, several windows


def test_blend_is_the_alpha_mix() -> None:
    model = tiny_model(alpha=0.3)
    torch.manual_seed(1)
    s, lg = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(model.blend(s, lg), 0.3 * s + 0.7 * lg)
    assert float(model.alpha) == pytest.approx(0.3)
    assert not any("alpha" in name for name, _ in model.named_parameters())
    sasrec = tiny_model(alpha=1.0)
    torch.testing.assert_close(sasrec.blend(s, lg), s)


def test_learned_alpha_starts_at_config_and_trains() -> None:
    model = tiny_model(alpha=0.3, learn_alpha=True)
    assert model.alpha.item() == pytest.approx(0.3, abs=1e-6)
    params = dict(model.named_parameters())
    assert "alpha_logit" in params and params["alpha_logit"].requires_grad
    s, lg = torch.ones(2, 8), torch.zeros(2, 8)
    model.blend(s, lg).sum().backward()
    # d/dlogit of sum(alpha * 1) = 16 * alpha * (1 - alpha)
    assert params["alpha_logit"].grad.item() == pytest.approx(16 * 0.3 * 0.7, rel=1e-5)
    opt = torch.optim.SGD([params["alpha_logit"]], lr=0.1)
    opt.step()  # descending sum(blend) = 16 * alpha lowers alpha
    assert model.alpha.item() < 0.3


def test_several_windows_build_several_long_branches() -> None:
    both = tiny_model(windows=(2, 3))
    assert [b.window for b in both.longs] == [2, 3]
    x = left_padded([6, 3], 6)
    with torch.no_grad():
        short, long = both(x)
    assert short.shape == long.shape == (2, 6, 8)
    # The long output is the mean of the branches: rebuild each as a one-window model.
    outs = []
    for i, w in enumerate((2, 3)):
        one = tiny_model(windows=(w,))
        one.item_emb.load_state_dict(both.item_emb.state_dict())
        one.pos_emb.load_state_dict(both.pos_emb.state_dict())
        one.short.load_state_dict(both.short.state_dict())
        one.longs[0].load_state_dict(both.longs[i].state_dict())
        with torch.no_grad():
            s1, l1 = one(x)
        torch.testing.assert_close(s1, short)
        outs.append(l1)
    torch.testing.assert_close(long, (outs[0] + outs[1]) / 2, atol=1e-6, rtol=0)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


# ---------------------------------------------------------------- embeddings


def test_padding_row_is_zero_and_gets_no_gradient() -> None:
    torch.manual_seed(0)
    model = MQSA(tiny_config()).train()
    weight = model.item_emb.weight
    assert weight[PAD].abs().max() == 0
    assert weight[:PAD].abs().max() > 0
    assert weight[:PAD].std().item() == pytest.approx(0.01, rel=0.3)
    x = left_padded([8, 3], 8)
    short, long = model(x)
    (model.blend(short, long) @ model.item_embeddings().T).logsumexp(-1).sum().backward()
    assert weight.grad[PAD].abs().max() == 0
    used = torch.unique(x[x != PAD])
    assert weight.grad[used].abs().sum(1).min() > 0


def test_linear_init_glorot_zeroes_biases_and_widens_weights() -> None:
    torch.manual_seed(0)
    default = MQSA(tiny_config(hidden_size=64, num_blocks=1))
    torch.manual_seed(0)
    glorot = MQSA(tiny_config(hidden_size=64, num_blocks=1, linear_init="glorot"))
    linears = [m for m in glorot.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 5  # short and long branch: query, key, value, two FFN layers
    for layer in linears:
        assert layer.bias.abs().max() == 0
        assert layer.weight.std().item() == pytest.approx((2 / (64 + 64)) ** 0.5, rel=0.1)
    torch_query = default.short.blocks[0].query
    assert torch_query.bias.abs().max() > 0
    assert torch_query.weight.std().item() == pytest.approx((1 / (3 * 64)) ** 0.5, rel=0.1)
    # the embeddings are drawn first, so both inits share them
    torch.testing.assert_close(glorot.item_emb.weight, default.item_emb.weight)


def test_item_embeddings_leave_out_padding() -> None:
    model = tiny_model()
    table = model.item_embeddings()
    assert table.shape == (N_ITEMS, 8)
    torch.testing.assert_close(table, model.item_emb.weight[:N_ITEMS])


def test_embed_items_scales_by_sqrt_d_as_the_input_layer_does() -> None:
    model = tiny_model()
    items = torch.tensor([0, 5, PAD])
    torch.testing.assert_close(model.embed_items(items), model.item_emb(items) * math.sqrt(8), atol=0, rtol=0)
    assert model.embed_items(items)[2].abs().max() == 0  # padding stays zero


def test_student_vectors_drop_out_only_in_training() -> None:
    model = tiny_model()
    items = torch.arange(N_ITEMS)
    torch.testing.assert_close(model.student_vectors(items), model.embed_items(items), atol=0, rtol=0)
    model.train()
    dropped = model.student_vectors(items)
    zeros = (dropped == 0).float().mean().item()
    assert 0.3 < zeros < 0.7  # dropout 0.5
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * model.embed_items(items)[kept])


def test_real_position_queries_equal_the_full_width_forward() -> None:
    """Grouping rows by length and trimming each group changes nothing: z at every real target."""
    model = tiny_model(max_len=20)
    lengths = [1, 2, 3, 5, 9, 14, 20, 4]
    inputs = left_padded(lengths, 20, seed=3)
    targets = left_padded(lengths, 20, seed=4)
    targets[0, -1] = PAD  # a row whose only slot has no target
    z, t = model.real_position_queries(inputs, targets)
    with torch.no_grad():
        short, long = model(inputs)
    real = targets != PAD
    by_row = sorted(range(len(lengths)), key=lambda b: lengths[b])  # groups by length (4, 8, 16, 20)
    expected_z = torch.cat([model.blend(short[b][real[b]], long[b][real[b]]) for b in by_row])
    expected_t = torch.cat([targets[b][real[b]] for b in by_row])
    assert z.shape == (int(real.sum()), 8)
    torch.testing.assert_close(t, expected_t, atol=0, rtol=0)
    torch.testing.assert_close(z, expected_z, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no real position"):
        model.real_position_queries(inputs, torch.full_like(targets, PAD))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 10, "num_heads": 3}, "hidden_size"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"windows": ()}, "windows"),
        ({"windows": (0,)}, "windows"),
        ({"windows": (3, 0)}, "windows"),
        ({"num_items": 0}, "num_items"),
        ({"max_len": 0}, "max_len"),
        ({"dropout": 1.0}, "dropout"),
        ({"window_decay": 0.0}, "window_decay"),
        ({"window_decay": 1.5}, "window_decay"),
        ({"alpha": 1.0, "learn_alpha": True}, "alpha"),
        ({"linear_init": "xavier"}, "linear_init"),
    ],
)
def test_config_rejects_bad_values(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        tiny_config(**overrides)


def test_config_from_dict_rejects_unknown_field() -> None:
    d = tiny_config().to_dict()
    d["hiden_size"] = 64
    with pytest.raises(ConfigError, match="hiden_size"):
        MQSAConfig.from_dict(d)


def test_config_round_trip() -> None:
    cfg = tiny_config(windows=(2, 4), alpha=0.3, learn_alpha=True, window_decay=0.7, dropout=0.2)
    d = cfg.to_dict()
    assert d["windows"] == [2, 4]
    back = MQSAConfig.from_dict(d)
    assert back == cfg
    assert back.windows == (2, 4)
    assert back.padding_idx == N_ITEMS


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_dropout_train_mode_rate_and_scale(p: float) -> None:
    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = torch.ones(200, 500)
    y = drop(x)
    zero_frac = (y == 0).float().mean().item()
    assert zero_frac == pytest.approx(p, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    kept = y[y != 0]
    assert kept.min().item() == pytest.approx(kept.max().item())  # one scale for every kept entry
    assert kept[0].item() == pytest.approx(1 / (1 - p), rel=0.03)


def test_dropout_eval_mode_and_zero_rate_are_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 40)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_model_eval_is_deterministic_and_train_is_not() -> None:
    model = tiny_model()
    x = left_padded([8, 4], 8)
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        model.train()
        c, d = model(x)[0], model(x)[0]
    assert (c - d).abs().max() > 1e-3
    assert math.isfinite(c.sum().item())


@pytest.mark.parametrize("sparse", [False, True])
def test_item_total_is_the_sum_of_the_real_items_rows_and_its_gradient(sparse: bool) -> None:
    """item_total() = item_embeddings().sum(0), the padding row left out even when it is not
    zero, and the same gradient: every real row gets it, the padding row none."""
    model = tiny_model()
    with torch.no_grad():
        model.item_emb.weight[PAD].fill_(3.0)  # a non-zero padding row must not count
    model.use_sparse_item_gradients(sparse)
    weights = torch.randn(model.config.hidden_size)
    (model.item_total() * weights).sum().backward()
    grad = model.item_emb.weight.grad.to_dense()
    assert torch.allclose(model.item_total(), model.item_embeddings().sum(0), atol=1e-5)
    assert torch.allclose(grad[:N_ITEMS], weights.expand(N_ITEMS, -1))
    assert torch.equal(grad[PAD], torch.zeros_like(weights))
