"""attnzoo::paged_decode (the C++ op, or its PyTorch form where the extension is not built) against the paged
attention reference in float64: random shapes with odd sizes, GQA/MQA/MHA, sliding windows, sinks, long contexts
split over threads, padded rows, and fp32/bf16 caches; the K/V writes land exactly where the slots say."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.attention.paged import paged_attention_reference
from attnzoo.ops.attention.paged_decode import paged_decode, paged_decode_torch
from attnzoo.ops.extension import HAVE_KERNEL

CASES = [  # B, H, Hkv, d, dv, page_size, pages in pool, pages per row, window_left, sinks, dtype
    (3, 6, 2, 16, 16, 4, 40, 9, -1, False, torch.float32),
    (5, 8, 8, 20, 12, 8, 60, 7, 5, True, torch.float32),
    (1, 7, 1, 33, 33, 5, 30, 11, -1, True, torch.float32),
    (4, 6, 3, 8, 8, 4, 200, 180, -1, False, torch.float32),   # 720 keys: several chunks merged by log-sum-exp
    (4, 6, 3, 8, 8, 4, 200, 180, 300, False, torch.float32),  # a window across chunks
    (2, 4, 1, 64, 64, 16, 30, 12, -1, True, torch.bfloat16),
]


def _problem(B, H, Hkv, d, dv, ps, P, W, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    kc, vc = torch.randn(Hkv, P, ps, d, generator=g).to(dtype), torch.randn(Hkv, P, ps, dv, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(P, generator=g)[:W] for _ in range(B)]).int()
    lens = torch.randint(1, W * ps + 1, (B,), generator=g).int()
    lens[0] = W * ps
    if B > 2:
        lens[-1] = 0   # a padded row: no keys, no slot
    q, k, v = (torch.randn(B, n, e, generator=g).to(dtype) for n, e in ((H, d), (Hkv, d), (Hkv, dv)))
    last = (lens - 1).long().clamp(min=0)
    slots = tables.long().gather(1, (last // ps)[:, None])[:, 0] * ps + last % ps
    slots[lens == 0] = -1
    return q, kc, vc, k, v, slots, tables, lens


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["op", "torch"])
def test_paged_decode_matches_reference(case, impl):
    B, H, Hkv, d, dv, ps, P, W, window_left, with_sinks, dtype = case
    if impl == "op" and not HAVE_KERNEL:
        pytest.skip("attnzoo._C is not built: the op is the PyTorch form, tested as 'torch'")
    q, kc, vc, k, v, slots, tables, lens = _problem(B, H, Hkv, d, dv, ps, P, W, dtype, seed=B * 31 + d)
    sinks = torch.randn(H) if with_sinks else None
    expect_k, expect_v = kc.clone(), vc.clone()
    for cache, new in ((expect_k, k), (expect_v, v)):
        for b in range(B):
            if slots[b] >= 0:
                cache.view(Hkv, -1, cache.shape[-1])[:, slots[b]] = new[b]
    f = paged_decode if impl == "op" else paged_decode_torch
    out = torch.full((B, H, dv), float("nan"), dtype=dtype)
    out[:] = f(q, kc, vc, k, v, slots, tables, lens, d ** -0.5, window_left, sinks)
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)   # writes are copies: exact
    real = lens > 0
    n = int(real.sum())
    cu = torch.arange(n + 1, dtype=torch.int32)
    ref = paged_attention_reference(q[real].double(), kc.double(), vc.double(), tables[real], cu, lens[real],
                                    window_size=(window_left, 0) if window_left >= 0 else (-1, -1), scale=d ** -0.5,
                                    sinks=None if sinks is None else sinks.double())
    # fp32 accumulation; bf16 adds the rounding of the output to bf16
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out[real].double(), ref, atol=tol, rtol=tol)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))   # padded rows: zeros


@pytest.mark.skipif(not HAVE_KERNEL, reason="attnzoo._C is not built")
def test_paged_decode_errors():
    q, kc, vc, k, v, slots, tables, lens = _problem(2, 4, 2, 8, 8, 4, 10, 3, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        paged_decode(q, kc, vc, k, v, slots, tables, lens + 100, 0.3)
    with pytest.raises(RuntimeError, match="not a multiple"):
        paged_decode(q[:, :3], kc, vc, k, v, slots, tables, lens, 0.3)
    with pytest.raises(RuntimeError, match="outside the cache"):
        paged_decode(q, kc, vc, k, v, slots + 10_000, tables, lens, 0.3)
