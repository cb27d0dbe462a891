"""The tolerance rule every fast form is held to: on the finite entries, |out - ref64| <= 2 * |ref_same - ref64|
+ eps * max(1, |ref64|), where ref64 is the reference in float64 and ref_same the reference in out's dtype (so
the allowance is what that dtype costs the spec itself). Infinite entries (the LSE of a row that sees no key)
must match exactly; a NaN (an element a kernel never wrote, under the poison) never passes."""

from __future__ import annotations

import torch


def close(out: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor, eps: float = 1e-5, what: str = "") -> None:
    out, ref64, ref_same = (t.detach().double().cpu() for t in (out, ref64, ref_same))
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    assert not out.isnan().any(), f"{what}: NaN (an element the kernel never wrote?)"
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(out), inf) and torch.equal(out[inf], ref64[inf]), f"{what}: infinities differ"
    if not (~inf).any():
        return
    scale = max(1.0, ref64[~inf].abs().max().item())
    err = (out - ref64)[~inf].abs().max().item()
    base = (ref_same - ref64)[~inf].abs().max().item()
    assert err <= 2 * base + eps * scale, \
        f"{what}: error {err:.3g} > 2 * reference error {base:.3g} + {eps * scale:.3g}"
