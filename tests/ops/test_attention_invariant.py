"""Batch-invariant attention: accurate against float64, and a query's bits independent of its batch: alone,
in any prefill chunk, as a decode row among others, over contiguous or paged keys."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.attention import attention
from attnzoo.ops.attention.invariant import (KEY_BLOCK, attend_rows, attend_shared, attention_invariant, block_pad,
                                             tree_sum)
from attnzoo.ops.attention.paged import paged_attention
from attnzoo.ops.attention.reference import visible
from attnzoo.ops.batch_invariant import batch_invariant

CASES = [  # (T, H, Hkv, d, dv, window, sinks)
    (300, 6, 2, 64, 64, (-1, 0), False),
    (75, 4, 4, 32, 32, (40, 0), True),
    (260, 8, 1, 72, 40, (-1, 0), True),     # d not a multiple of 16 (padded items), dv != d, MQA
    (129, 3, 3, 16, 16, (-1, 0), False),
]


def qkv(T, H, Hkv, d, dv, dtype, seed=0, B=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)   # noqa: E731
    return mk(B, T, H, d), mk(B, T, Hkv, d), mk(B, T, Hkv, dv)


def test_tree_sum_ignores_trailing_zero_blocks():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 8, 13):
        x = torch.randn(4, n, 7, generator=g)
        want = tree_sum(x, 1)
        for extra in (1, 3, 11, 40):
            padded = torch.cat([x, torch.zeros(4, extra, 7)], 1)
            assert torch.equal(tree_sum(padded, 1), want)
        torch.testing.assert_close(want.double(), x.double().sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T, H, Hkv, d, dv, window, with_sinks", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accuracy_against_float64(T, H, Hkv, d, dv, window, with_sinks, dtype):
    q, k, v = qkv(T, H, Hkv, d, dv, dtype, B=2)
    sinks = torch.randn(H) if with_sinks else None
    ref = attention(q.double(), k.double(), v.double(), causal=True, window_size=window,
                    sinks=None if sinks is None else sinks.double(), backend="reference")
    out, lse = attention_invariant(q, k, v, causal=True, window_size=window, sinks=sinks, return_lse=True)
    plain = attention(q, k, v, causal=True, window_size=window, sinks=sinks, backend="reference")
    err, base = (out.double() - ref).abs().max(), (plain.double() - ref).abs().max()
    assert out.dtype == dtype and err <= 2 * base + 1e-6, (err, base)
    _, ref_lse = attention(q.double(), k.double(), v.double(), causal=True, window_size=window,
                           sinks=None if sinks is None else sinks.double(), backend="reference", return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, H, Hkv, d, dv, window, with_sinks", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_gets_the_same_bits_alone_and_in_any_chunk(T, H, Hkv, d, dv, window, with_sinks, dtype):
    q, k, v = qkv(T, H, Hkv, d, dv, dtype, seed=1)
    sinks = torch.randn(H) if with_sinks else None
    full = attention_invariant(q, k, v, causal=True, window_size=window, sinks=sinks)
    for t in sorted({0, 1, KEY_BLOCK - 1, KEY_BLOCK, KEY_BLOCK + 1, T - 1} & set(range(T))):
        alone = attention_invariant(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], causal=True, window_size=window,
                                    sinks=sinks)
        assert torch.equal(alone[:, 0], full[:, t]), t
    cuts = [0, T // 3, T // 3 + 1, T]
    chunks = torch.cat([attention_invariant(q[:, a:b], k[:, :b], v[:, :b], causal=True, window_size=window,
                                            sinks=sinks) for a, b in zip(cuts, cuts[1:])], 1)
    assert torch.equal(chunks, full)
    # packed varlen with another sequence beside it
    q2, k2, v2 = qkv(50, H, Hkv, d, dv, dtype, seed=2)
    cu = torch.tensor([0, 50, 50 + T], dtype=torch.int32)
    packed = attention_invariant(torch.cat([q2, q], 1), torch.cat([k2, k], 1), torch.cat([v2, v], 1), causal=True,
                                 window_size=window, sinks=sinks, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert torch.equal(packed[:, 50:], full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_rows_equal_the_shared_form(dtype):
    g = torch.Generator().manual_seed(3)
    for T, Hkv, G, d, dv, window in [(300, 2, 3, 64, 64, (-1, 0)), (260, 1, 8, 72, 40, (100, 0))]:
        q = torch.randn(T, Hkv, G, d, generator=g, dtype=dtype)
        k = block_pad(torch.randn(Hkv, T, d, generator=g, dtype=dtype), 1, 0)
        v = block_pad(torch.randn(Hkv, T, dv, generator=g, dtype=dtype), 1, 0)
        seen = block_pad(visible(T, T, window, "cpu"), 1, 0)
        for sinks in (None, torch.randn(Hkv, G, generator=g, dtype=dtype)):
            o, lse = attend_shared(q, k, v, seen, 0.125, None if sinks is None else sinks.reshape(-1))
            rows = [0, 5, 127, 128, 200, T - 1]
            kr = k[None].expand(len(rows), -1, -1, -1).contiguous()
            vr = v[None].expand(len(rows), -1, -1, -1).contiguous()
            o2, lse2 = attend_rows(q[rows], kr, vr, seen[rows], 0.125, sinks)
            assert torch.equal(o2, o[rows]) and torch.equal(lse2, lse[rows])


def make_pages(seqs, Hkv, d, page, dtype, g, poison=True):
    """Scatter each sequence's k/v [L, Hkv, d] into a shuffled page pool; unused slots hold NaN."""
    num = sum(-(-len(k) // page) for k, _ in seqs) + 3
    kc = torch.full((Hkv, num, page, d), float("nan") if poison else 0.0, dtype=dtype)
    vc = kc.clone()
    perm = torch.randperm(num, generator=g).tolist()
    table = torch.zeros(len(seqs), max(-(-len(k) // page) for k, _ in seqs), dtype=torch.int32)
    for b, (k, v) in enumerate(seqs):
        for p in range(-(-len(k) // page)):
            pg = perm.pop()
            table[b, p] = pg
            n = min(page, len(k) - p * page)
            kc[:, pg, :n] = k[p * page:p * page + n].transpose(0, 1)
            vc[:, pg, :n] = v[p * page:p * page + n].transpose(0, 1)
    return kc, vc, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, with_sinks", [((-1, -1), False), ((37, 0), True)])
def test_paged_invariant_equals_dense_for_any_batch(dtype, window, with_sinks):
    """Decode rows and prefill runs over NaN-poisoned pages give the dense invariant form's bits, whatever
    else is in the step."""
    g = torch.Generator().manual_seed(4)
    H, Hkv, d, page = 6, 2, 32, 16
    sinks = torch.randn(H, generator=g) if with_sinks else None
    lens = [300, 45, 129, 1]
    seqs = [(torch.randn(L, Hkv, d, generator=g).to(dtype), torch.randn(L, Hkv, d, generator=g).to(dtype))
            for L in lens]
    qs = [torch.randn(L, H, d, generator=g).to(dtype) for L in lens]
    kc, vc, table = make_pages(seqs, Hkv, d, page, dtype, g)
    dense = [attention_invariant(q[None], k[None], v[None], causal=True, window_size=window, sinks=sinks)[0]
             for q, (k, v) in zip(qs, seqs)]
    # steps mixing decode rows (one query) and prefill runs (several), in different company
    for n_new in ([1, 1, 1, 1], [300, 1, 20, 1], [7, 45, 1, 1], [1, 3, 129, 1]):
        q = torch.cat([qq[L - n:] for qq, L, n in zip(qs, lens, n_new)])
        cu = torch.tensor([0] + torch.tensor(n_new).cumsum(0).tolist(), dtype=torch.int32)
        with batch_invariant():
            out = paged_attention(q, kc, vc, table, cu, torch.tensor(lens), window_size=window, sinks=sinks)
        assert not out.isnan().any()
        for b, (L, n) in enumerate(zip(lens, n_new)):
            assert torch.equal(out[int(cu[b]):int(cu[b + 1])], dense[b][L - n:]), (n_new, b)


def test_paged_invariant_needs_a_page_size_dividing_the_key_block():
    q = torch.randn(1, 2, 8)
    kc = torch.randn(1, 4, 24, 8)
    with batch_invariant(), pytest.raises(ValueError, match="page size dividing"):
        paged_attention(q, kc, kc, torch.tensor([[0]]), torch.tensor([0, 1], dtype=torch.int32), torch.tensor([5]))
