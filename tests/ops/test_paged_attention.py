"""Paged attention against its reference and against dense attention on the same keys."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.attention import attention_reference
from attnzoo.ops.attention.paged import paged_attention, paged_attention_reference


def make_case(q_lens, seq_lens, H=6, Hkv=2, d=16, page=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B = len(q_lens)
    pages_per = [-(-L // page) for L in seq_lens]
    num_pages = sum(pages_per) + 5
    perm = torch.randperm(num_pages, generator=g)  # scattered, non-contiguous pages
    table = torch.zeros(B, max(pages_per), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per):
        table[b, :n] = perm[used:used + n]
        used += n
    kc = torch.randn(Hkv, num_pages, page, d, generator=g, dtype=dtype)
    vc = torch.randn(Hkv, num_pages, page, d, generator=g, dtype=dtype)
    q = torch.randn(sum(q_lens), H, d, generator=g, dtype=dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return q, kc, vc, table, cu, torch.tensor(seq_lens), page


@pytest.mark.parametrize("q_lens, seq_lens", [
    ([1, 1, 1], [1, 9, 30]),            # pure decode, awkward lengths
    ([5, 1, 13, 1], [5, 17, 20, 4]),    # prefill from empty, decode, chunk after a cached prefix
    ([1], [63]),
])
@pytest.mark.parametrize("window", [(-1, -1), (6, 0)])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_paged_matches_reference_and_dense(q_lens, seq_lens, window, with_sinks):
    q, kc, vc, table, cu, lens, page = make_case(q_lens, seq_lens)
    sinks = torch.randn(q.shape[1]) if with_sinks else None
    out = paged_attention(q, kc, vc, table, cu, lens, window_size=window, sinks=sinks)
    ref = paged_attention_reference(q, kc, vc, table, cu, lens, window_size=window, sinks=sinks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the reference itself: gather by hand, float64 dense attention
    for b in range(len(q_lens)):
        slots = [int(table[b, p // page]) * page + p % page for p in range(seq_lens[b])]
        k = kc.reshape(kc.shape[0], -1, kc.shape[-1])[:, slots].transpose(0, 1).double()  # by hand: [L, Hkv, d]
        v = vc.reshape(vc.shape[0], -1, vc.shape[-1])[:, slots].transpose(0, 1).double()
        qq = q[int(cu[b]):int(cu[b + 1])].double()
        dense = attention_reference(qq[None], k[None], v[None], causal=True, window_size=window,
                                    sinks=None if sinks is None else sinks.double())[0]
        torch.testing.assert_close(out[int(cu[b]):int(cu[b + 1])].double(), dense, rtol=1e-4, atol=1e-5)


def test_paged_rejects_bad_shapes():
    q, kc, vc, table, cu, lens, _ = make_case([1], [5])
    with pytest.raises(ValueError, match="expected q"):
        paged_attention(q[None], kc, vc, table, cu, lens)
    with pytest.raises(ValueError, match="keys"):
        paged_attention(q, kc, vc, table, cu, torch.tensor([0]))


@pytest.mark.parametrize("with_sinks", [False, True])
def test_shared_prefix_cascade_matches_reference(with_sinks):
    from attnzoo.ops.attention.paged import plan_paged
    g = torch.Generator().manual_seed(3)
    H, Hkv, d, page = 6, 2, 16, 4
    kc = torch.randn(Hkv, 40, page, d, generator=g)
    vc = torch.randn(Hkv, 40, page, d, generator=g)
    # rows 0-2 share pages 5, 6, 7 (a radix hit), row 3 shares only page 5, row 4 is alone
    table = torch.tensor([[5, 6, 7, 10, 11, 0], [5, 6, 7, 12, 0, 0], [5, 6, 7, 8, 13, 14],
                          [5, 20, 21, 0, 0, 0], [30, 31, 0, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([19, 13, 22, 10, 6])
    cu = torch.arange(6, dtype=torch.int32)  # one decode query each
    q = torch.randn(5, H, d, generator=g)
    sinks = torch.randn(H, generator=g) if with_sinks else None
    plan = plan_paged(table, cu, lens, page)
    assert [r.tolist() for r, _ in plan.cascades] == [[0, 1, 2]]  # rows 0-3 share page 5; 0-2 share three
    assert plan.cascades[0][1].tolist() == [5, 6, 7]
    out = paged_attention(q, kc, vc, table, cu, lens, sinks=sinks)
    ref = paged_attention_reference(q, kc, vc, table, cu, lens, sinks=sinks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
