"""NativeSparseAttention layer: packed varlen == each sequence alone, gradients reach every parameter, and
with every block selected and only the selection gate open it is dense causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import Batch, CacheKind, ContiguousKVCache, RotaryEmbedding
from attnzoo.layers.nsa import NativeSparseAttention

F64 = torch.float64
HID, H, HKV, D = 32, 4, 2, 8


def _layer(seed: int = 0, **kw) -> NativeSparseAttention:
    torch.manual_seed(seed)
    cfg = dict(block_len=8, stride=4, select_block=16, num_selected=4, window=8)
    cfg.update(kw)
    layer = NativeSparseAttention(0, HID, H, HKV, D, **cfg).double()
    with torch.no_grad():  # fresh random weights everywhere (position tables and norms included)
        for p in layer.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.5)
    return layer


def _packed(lens: list[int]) -> Batch:
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])
    return Batch(positions=pos, cu_seqlens=cu)


MODES = {
    "paper": dict(qk_norm=True),
    "fla": dict(shared_kv=True, compress="mean", block_len=8, stride=8, select_block=8, num_selected=4),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_packed_varlen_equals_each_sequence_alone(mode: str) -> None:
    layer = _layer(1, **MODES[mode])
    rotary = RotaryEmbedding(D, 10000.0)
    lens = [37, 100, 20]
    x = torch.randn(sum(lens), HID, dtype=F64)
    batch = _packed(lens)
    with torch.no_grad():
        out = layer(x, rotary(batch.positions), batch)
        a = 0
        for n in lens:
            one = Batch.dense(1, n)
            alone = layer(x[a:a + n], rotary(one.positions), one)
            torch.testing.assert_close(out[a:a + n], alone, rtol=1e-12, atol=1e-12)
            a += n
        # equal lengths take the batched path: same as packed-with-a-loop
        x2 = torch.randn(2 * 40, HID, dtype=F64)
        dense = Batch.dense(2, 40)
        both = layer(x2, rotary(dense.positions), dense)
        for i in range(2):
            one = Batch.dense(1, 40)
            alone = layer(x2[40 * i:40 * (i + 1)], rotary(one.positions), one)
            torch.testing.assert_close(both[40 * i:40 * (i + 1)], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_reach_every_parameter(mode: str) -> None:
    layer = _layer(2, **MODES[mode])
    rotary = RotaryEmbedding(D, 10000.0)
    lens = [45, 30]
    batch = _packed(lens)
    x = torch.randn(sum(lens), HID, dtype=F64, requires_grad=True)
    out = layer(x, rotary(batch.positions), batch)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert x.grad is not None and x.grad.abs().max() > 0
    # each slice of the fused projection: q, then (k, v) per branch (compression, selection, window)
    g = layer.qkv_proj.weight.grad
    widths = [H * D] + [HKV * D] * (2 * layer.kv_sets)
    names = ["q"] + [f"{kv}_{br}" for br in (["cmp", "slc", "win"] if layer.kv_sets == 3 else ["shared"])
                     for kv in "kv"]
    for name, part in zip(names, g.split(widths, 0)):
        assert part.abs().max() > 1e-6, f"no gradient reaches the {name} projection"
    if mode == "paper":
        named = dict(layer.named_parameters())
        for name in ("k_pos", "v_pos", "k_compress.0.weight", "v_compress.2.weight", "gate.0.weight", "gate.2.weight"):
            assert named[name].grad.abs().max() > 1e-6, name


def _only_selection(layer: NativeSparseAttention) -> None:
    """Gate MLP's last layer: weight 0, bias so sigmoid gives (cmp, slc, win) = (~0, 1, ~0) per head."""
    with torch.no_grad():
        layer.gate[-1].weight.zero_()
        layer.gate[-1].bias.copy_(torch.tensor([-80.0, 80.0, -80.0], dtype=F64).repeat(H))


def _dense_causal_selection(layer: NativeSparseAttention, x: torch.Tensor, rope, T: int) -> torch.Tensor:
    """o_proj(causal softmax attention of q over the selection branch's K/V), computed with torch SDPA."""
    q, kvs = layer.project(x, rope)
    k, v = kvs[1] if layer.kv_sets == 3 else kvs[0]
    o = F.scaled_dot_product_attention(q.view(1, T, H, D).transpose(1, 2), k.view(1, T, HKV, D).transpose(1, 2),
                                       v.view(1, T, HKV, D).transpose(1, 2), is_causal=True, enable_gqa=True)
    return layer.o_proj(o.transpose(1, 2).reshape(T, H * D))


@pytest.mark.parametrize("mode", list(MODES))
def test_selection_of_every_block_is_dense_causal_attention(mode: str) -> None:
    """n * l' >= T and window >= T, only the selection gate open: selection attention sees every past
    token, so the layer equals dense causal attention. With fewer blocks it must differ (the check can fail)."""
    T = 64
    l_sel = MODES[mode].get("select_block", 16)
    rotary = RotaryEmbedding(D, 10000.0)
    one = Batch.dense(1, T)
    rope = rotary(one.positions)
    x = torch.randn(T, HID, dtype=F64)
    cfg = dict(MODES[mode], num_selected=T // l_sel, window=T)
    layer = _layer(3, **cfg)
    _only_selection(layer)
    with torch.no_grad():
        dense = _dense_causal_selection(layer, x, rope, T)
        torch.testing.assert_close(layer(x, rope, one), dense, rtol=1e-10, atol=1e-10)
        layer.num_selected = 3  # block 0 + the two local blocks only: far tokens are dropped
        diff = (layer(x, rope, one) - dense).abs().max().item()
    assert diff > 1e-3, f"3 of {T // l_sel} blocks should not give dense attention (max diff {diff:.2e})"


def test_cached_path_equals_one_pass() -> None:
    """Through a cache (raw K/V rows + one compressed row per completed block) a prefill chunk and then
    token-by-token steps give the one-pass outputs, past several compression and selection blocks."""
    layer = _layer(4)
    rows, cmp = layer.cache_spec()
    assert (rows.kind, cmp.kind) == (CacheKind.ROWS, CacheKind.COMPRESSED)
    assert rows.dim == 3 * 2 * HKV * D and (cmp.dim, cmp.block_len, cmp.stride) == (2 * HKV * D, 8, 4)
    x = torch.randn(40, HID, dtype=F64)
    full = layer(x, None, Batch.dense(1, 40))   # rope may be None (no positions rotated)
    cache = ContiguousKVCache(batch_size=1, max_len=40)
    outs = [layer(x[:7], None, Batch.dense(1, 7, cache=cache))]
    for t in range(7, 40):
        cache.length = t
        outs.append(layer(x[t:t + 1], None, Batch.dense(1, 1, start=t, cache=cache)))
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-10, atol=1e-10)
