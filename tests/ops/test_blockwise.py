"""Blockwise (flash-style) attention vs the reference: forward, LSE and gradients, plus its O(T) memory.

Tolerance rule (tests/ops/tolerance.py): |blockwise - ref64| <= 2 * |ref_same_dtype - ref64| + eps.
Inputs are fresh random draws each run; the seed is in every failure message.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest
import torch

from attnzoo.ops.attention import attention, attention_reference
from attnzoo.ops.attention.blockwise import attention_blockwise
from tests.ops.tolerance import close


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make(B: int, Tq: int, Tk: int, H: int, Hkv: int, d: int, dv: int, sinks: bool, seed: int,
         dtype: torch.dtype = torch.float32) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, d, generator=g).to(dtype)
    k = torch.randn(B, Tk, Hkv, d, generator=g).to(dtype)
    v = torch.randn(B, Tk, Hkv, dv, generator=g).to(dtype)
    return [q, k, v, torch.randn(H, generator=g).to(dtype) if sinks else None]


def outputs_and_grads(fn, ts: list[torch.Tensor | None], seed: int, **kw) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """[out, lse, dq, dk, dv, (dsinks)] for a random weighting of out and lse (so dlse is exercised too)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
    out, lse = fn(leaves[0], leaves[1], leaves[2], sinks=leaves[3], return_lse=True, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(out.shape, generator=g).to(out.dtype)
    w_lse = torch.randn(lse.shape, generator=g).to(lse.dtype)
    lse_live = lse.masked_fill(torch.isinf(lse), 0.0)  # dead rows: LSE is -inf, and carries no gradient
    ((out * w_out).sum() + (lse_live * w_lse).sum()).backward()
    return [out, lse] + [t.grad for t in leaves if t is not None]


def check_against_reference(ts: list[torch.Tensor | None], seed: int, eps: float = 2e-6, **kw) -> None:  # type: ignore[no-untyped-def]
    fast = outputs_and_grads(attention_blockwise, ts, seed, **{k: v for k, v in kw.items()})
    ref_kw = {k: v for k, v in kw.items() if k not in ("block_q", "block_k")}
    ref64 = outputs_and_grads(attention_reference, [None if t is None else t.double() for t in ts], seed, **ref_kw)
    same = outputs_and_grads(attention_reference, ts, seed, **ref_kw)
    for name, a, b, c in zip(["out", "lse", "dq", "dk", "dv", "dsinks"], fast, ref64, same):
        assert a is not None and b is not None and c is not None, name
        assert a.dtype == c.dtype, (name, a.dtype, c.dtype)
        close(a, b, c, eps, f"{name} (seed={seed}, {kw})")


# B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks, block_q, block_k
CASES = [
    (2, 1, 1, 3, 1, 16, 16, True, (-1, -1), False, 4, 4),  # T = 1
    (1, 17, 17, 3, 3, 32, 32, True, (-1, -1), False, 5, 7),  # MHA, blocks do not divide T
    (2, 17, 17, 8, 1, 32, 32, False, (-1, -1), True, 16, 16),  # MQA, sinks
    (1, 63, 63, 6, 2, 32, 16, True, (-1, -1), True, 10, 13),  # GQA 3, dv != d
    (1, 63, 63, 9, 3, 32, 32, False, (7, 5), False, 8, 9),  # two-sided window: edge tiles masked
    (1, 130, 130, 8, 1, 64, 64, True, (20, -1), True, 32, 48),  # sliding window + sinks: far blocks skipped
    (1, 17, 130, 6, 2, 32, 32, True, (-1, -1), False, 8, 32),  # Tq < Tk: bottom-right causal
    (1, 130, 63, 6, 2, 32, 32, True, (-1, -1), False, 32, 32),  # Tq > Tk: first rows see nothing
    (1, 130, 63, 8, 8, 32, 32, True, (-1, -1), True, 24, 20),  # dead rows, but the sink keeps them alive
    (1, 63, 130, 3, 1, 32, 32, False, (-1, 3), True, 64, 64),  # right-only window, one query block
    (1, 1000, 1000, 3, 1, 64, 64, True, (-1, -1), False, 96, 160),
    (1, 1000, 1000, 6, 2, 32, 32, False, (100, 50), True, 128, 100),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_matches_reference(case: tuple) -> None:  # type: ignore[type-arg]
    B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks, bq, bk = case
    seed = fresh_seed()
    check_against_reference(make(B, Tq, Tk, H, Hkv, d, dv, sinks, seed), seed,
                            causal=causal, window_size=window, block_q=bq, block_k=bk)


def test_default_blocks_and_dispatcher() -> None:
    seed = fresh_seed()
    q, k, v, s = make(1, 600, 600, 9, 3, 64, 64, True, seed)
    out = attention(q, k, v, causal=True, sinks=s, backend="blockwise")
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True, sinks=s), rtol=1e-5, atol=1e-5)
    check_against_reference([q, k, v, s], seed, causal=True)


def test_bf16() -> None:
    seed = fresh_seed()
    # Both sides compute in fp32 from bf16 inputs and round once at the end; gradients too.
    check_against_reference(make(1, 75, 75, 9, 3, 64, 64, True, seed, torch.bfloat16), seed, eps=1e-2,
                            causal=True, window_size=(16, 0), block_q=16, block_k=32)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("rank3", [False, True])
def test_varlen_matches_loop_and_reference(rank3: bool) -> None:
    lq, lk = [5, 70, 33], [9, 70, 50]  # unequal, Tq != Tk in two of three
    seed = fresh_seed()
    q, k, v, s = make(1, sum(lq), sum(lk), 6, 2, 32, 32, True, seed)
    assert q is not None and k is not None and v is not None
    kw = dict(causal=True, window_size=(20, -1), cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), block_q=16, block_k=24)
    ts = [q[0], k[0], v[0], s] if rank3 else [q, k, v, s]
    o, lse = attention_blockwise(*ts[:3], sinks=s, return_lse=True, **kw)
    assert o.shape == ts[0].shape and lse.shape == (6, sum(lq))
    outs, lses = [], []
    for a, b, c, e in zip(_cu(lq).tolist(), _cu(lq)[1:].tolist(), _cu(lk).tolist(), _cu(lk)[1:].tolist()):
        oi, li = attention_blockwise(q[:, a:b], k[:, c:e], v[:, c:e], sinks=s, causal=True, window_size=(20, -1),
                                     return_lse=True, block_q=16, block_k=24)
        outs.append(oi)
        lses.append(li[0])
    torch.testing.assert_close(o, torch.cat(outs, 1)[0] if rank3 else torch.cat(outs, 1), rtol=0, atol=0)
    torch.testing.assert_close(lse, torch.cat(lses, 1), rtol=0, atol=0)
    check_against_reference(ts, seed, **kw)


def test_bad_blocks_are_a_clear_error() -> None:
    q, k, v, _ = make(1, 4, 4, 2, 1, 8, 8, False, 0)
    with pytest.raises(ValueError, match="block_q"):
        attention_blockwise(q, k, v, causal=True, block_q=0)


def test_long_sequence_matches_reference() -> None:
    # T = 3000 forward + backward against the full-matrix reference (small heads keep the
    # reference's [H, T, T] matrices near 100 MB in fp64).
    seed = fresh_seed()
    check_against_reference(make(1, 3000, 3000, 2, 1, 32, 32, True, seed), seed, causal=True)


@pytest.mark.slow
def test_long_sequence_gqa_window_matches_reference() -> None:
    seed = fresh_seed()
    check_against_reference(make(1, 4000, 4000, 6, 2, 64, 64, True, seed), seed,
                            causal=False, window_size=(1500, 700), block_q=200, block_k=300)


# Peak RSS from /proc/self/status VmHWM, reset through clear_refs: getrusage's ru_maxrss
# survives fork + exec on Linux, so a child of a big pytest process starts at the parent's peak.
_MEMORY_PROBE = textwrap.dedent("""
    import torch
    from attnzoo.ops.attention.blockwise import attention_blockwise
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    T, H, d = 8192, 2, 64
    q, k, v = (torch.randn(1, T, H, d, requires_grad=True) for _ in range(3))
    w = torch.randn(1, T, H, d)
    # Warm up at a small size so thread pools and the allocator are not counted.
    attention_blockwise(q[:, :512], k[:, :512], v[:, :512], causal=True).backward(w[:, :512])
    q.grad = k.grad = v.grad = None
    reset_peak()
    before = status("VmRSS")
    attention_blockwise(q, k, v, causal=True).backward(w)
    blockwise = status("VmHWM") - before
    assert q.grad is not None and q.grad.isfinite().all()
    # Control: the probe does see a T x T x H float32 matrix being written.
    reset_peak()
    before = status("VmRSS")
    big = torch.ones(H, T, T)
    control = status("VmHWM") - before
    print(blockwise, control, big.numel() * 4)
""")


def test_memory_is_linear_in_T() -> None:
    r = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    blockwise, control, t2 = (int(x) for x in r.stdout.split())
    assert control > 0.8 * t2, f"probe cannot see a {t2 / 1e6:.0f} MB allocation: {r.stdout}"
    assert blockwise < 150e6, f"forward+backward at T=8192 added {blockwise / 1e6:.0f} MB (T^2 matrix: {t2 / 1e6:.0f} MB)"
