"""MLA ops: expanded == absorbed == naive reference (float64), batched and varlen, plus gradients."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.latent import mla_absorbed, mla_expanded, mla_reference

H, DN, DR, DC, DV = 3, 8, 4, 12, 6
SCALE = (DN + DR) ** -0.5 * 1.37 ** 2  # mscale^2-style scale, not (dc + dr)^-0.5


def inputs(nq: tuple[int, ...], nk: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return [r(*nq, H, DN), r(*nq, H, DR), r(*nk, DC), r(*nk, DR), r(H, DN, DC) * 0.3, r(H, DV, DC) * 0.3]


@pytest.mark.parametrize("tq,tk", [(7, 7), (3, 9), (1, 11)])
@pytest.mark.parametrize("causal", [True, False])
def test_batched(tq: int, tk: int, causal: bool) -> None:
    args = inputs((2, tq), (2, tk), seed=tq * 100 + tk)
    ref = mla_reference(*args, scale=SCALE, causal=causal)
    for fn in (mla_expanded, mla_absorbed):
        torch.testing.assert_close(fn(*args, scale=SCALE, causal=causal), ref, rtol=1e-10, atol=1e-10)


def test_varlen() -> None:
    cu_q = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 13, 19], dtype=torch.int32)
    args = inputs((11,), (19,), seed=1)
    kw = dict(scale=SCALE, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref = mla_reference(*args, **kw)
    for fn in (mla_expanded, mla_absorbed):
        torch.testing.assert_close(fn(*args, **kw), ref, rtol=1e-10, atol=1e-10)


def test_expanded_gradients() -> None:
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    base = inputs((12,), (12,), seed=2)
    grads = []
    for fn in (mla_expanded, mla_reference):
        args = [t.clone().requires_grad_() for t in base]
        out = fn(*args, scale=SCALE, causal=True, cu_seqlens_q=cu)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out))
        grads.append([a.grad for a in args])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
