"""Triton select-then-attend (forward + backward), run on CPU through the Triton interpreter.

Every output buffer starts as NaN (ATTNZOO_TRITON_POISON=1), so an element a kernel skips fails.
Tolerance rule (tests/ops/tolerance.py): |triton - ref64| <= 2 * |ref_same_dtype - ref64| + eps,
for outputs, LSE and every gradient. ATTNZOO_TRITON_TEST_DEVICE=cuda runs the same cases compiled.
"""

from __future__ import annotations


import pytest
import torch

from attnzoo.ops.attention.reference import attention_reference
from attnzoo.ops.sparse.reference import (
    block_sparse_attention_reference,
    sparse_attention_reference,
)
from tests.ops.tolerance import close
from tests.ops.triton_env import DEVICE, INTERPRET, import_kernels, poison_outputs  # noqa: F401  (poison_outputs: an autouse fixture)

(tk,) = import_kernels("attnzoo.ops.sparse.triton_kernels")

EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# triton 3.9's interpreter computes tl.dot on bf16 operands wrongly (it multiplies the raw uint16 bits),
# so bf16 is only checked compiled on a GPU (as in test_flash_triton.py).
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRET, reason="interpreter: bf16 tl.dot is wrong"))


def make(B: int, Tq: int, Tk: int, H: int, Hkv: int, d: int, dv: int, dtype: torch.dtype = torch.float32,
         seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, Tq, H, d, generator=g).to(dtype), torch.randn(B, Tk, Hkv, d, generator=g).to(dtype),
            torch.randn(B, Tk, Hkv, dv, generator=g).to(dtype)]


def grads(fn, ts, sel, *args, dout, lse_w, causal=True):  # type: ignore[no-untyped-def]
    leaves = [t.detach().clone().to(DEVICE if fn.__module__.endswith("triton_kernels") else "cpu").requires_grad_(True)
              for t in ts]
    s = sel.to(leaves[0].device)
    out, lse = fn(*leaves, s, *args, causal=causal, return_lse=True)
    loss = (out.double() * dout.to(out.device).double()).sum()
    loss = loss + (torch.where(torch.isfinite(lse), lse, 0).double() * lse_w.to(lse.device).double()).sum()
    loss.backward()
    return out, lse, [t.grad for t in leaves]


def compare(ts: list[torch.Tensor], sel: torch.Tensor, *args, block: bool = False, backward: bool = True,  # type: ignore[no-untyped-def]
            causal: bool = True) -> None:
    tri = tk.block_sparse_attention_triton if block else tk.sparse_attention_triton
    ref = block_sparse_attention_reference if block else sparse_attention_reference
    dtype = ts[0].dtype
    eps = EPS[dtype]
    t64 = [t.double() for t in ts]
    if not backward:
        o, l = tri(*[t.to(DEVICE) for t in ts], sel.to(DEVICE), *args, causal=causal, return_lse=True)
        o64, l64 = ref(*t64, sel, *args, causal=causal, return_lse=True)
        os_, ls = ref(*ts, sel, *args, causal=causal, return_lse=True)
        close(o, o64, os_, eps, "out")
        close(l, l64, ls, eps, "lse")
        return
    g = torch.Generator().manual_seed(7)
    B, Tq, H = ts[0].shape[:3]
    dout = torch.randn(B, Tq, H, ts[2].shape[-1], generator=g)
    lse_w = torch.randn(B, H, Tq, generator=g)
    a = grads(tri, ts, sel, *args, dout=dout, lse_w=lse_w, causal=causal)
    b = grads(ref, t64, sel, *args, dout=dout, lse_w=lse_w, causal=causal)
    c = grads(ref, ts, sel, *args, dout=dout, lse_w=lse_w, causal=causal)
    for name, x, y, z in zip(("out", "lse", "dq", "dk", "dv"), (a[0], a[1], *a[2]), (b[0], b[1], *b[2]),
                             (c[0], c[1], *c[2])):
        close(x, y, z, eps, name)


TOKEN_CASES = [  # B, Tq, Tk, H, Hkv, d, dv, K
    (2, 37, 100, 8, 2, 16, 12, 24),  # GQA 4, awkward lengths, dv != d
    (1, 1, 100, 4, 1, 24, 20, 40),  # decode, MQA (DSA layout), d not a power of two
    (1, 9, 20, 2, 2, 8, 8, 48),  # G = 1, K > Tk (duplicates, -1, several index tiles)
]


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_sparse_fwd_bwd_match_reference(case):
    B, Tq, Tk, H, Hkv, d, dv, K = case
    ts = make(B, Tq, Tk, H, Hkv, d, dv)
    idx = torch.randint(-1, Tk, (B, Tq, Hkv, K), generator=torch.Generator().manual_seed(1))
    compare(ts, idx)


def test_not_causal():
    ts = make(1, 6, 40, 4, 2, 16, 16)
    idx = torch.randint(-1, 40, (1, 6, 2, 12), generator=torch.Generator().manual_seed(9))
    compare(ts, idx, causal=False)
    compare(ts, idx.clamp(max=4), 8, block=True, causal=False)


@pytest.mark.parametrize("bs,Tk,nb", [(8, 100, 5), (5, 37, 4), (80, 200, 2)])  # partial tail; odd bs; 2 tiles/block
def test_block_sparse_fwd_bwd_match_reference(bs, Tk, nb):
    B, Tq, H, Hkv, d = 1, 11, 8, 2, 16
    ts = make(B, Tq, Tk, H, Hkv, d, d)
    bidx = torch.randint(-1, -(-Tk // bs), (B, Tq, Hkv, nb), generator=torch.Generator().manual_seed(2))
    compare(ts, bidx, bs, block=True)


@pytest.mark.parametrize("G", [1, 4])
def test_all_keys_selected_equals_dense(G):
    B, Tq, Tk, Hkv, d = 1, 9, 30, 2, 16
    ts = make(B, Tq, Tk, Hkv * G, Hkv, d, d)
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(Tk, generator=g) for _ in range(B * Tq * Hkv)]).view(B, Tq, Hkv, Tk)
    o, lse = tk.sparse_attention_triton(*[t.to(DEVICE) for t in ts], idx.to(DEVICE), return_lse=True)
    o64, l64 = attention_reference(*[t.double() for t in ts], causal=True, return_lse=True)
    os_, ls = attention_reference(*ts, causal=True, return_lse=True)
    close(o, o64, os_, EPS[torch.float32], "out")
    close(lse, l64, ls, EPS[torch.float32], "lse")
    blocks = torch.arange(4).expand(B, Tq, Hkv, 4)  # ceil(30 / 8) = 4 blocks: everything
    ob = tk.block_sparse_attention_triton(*[t.to(DEVICE) for t in ts], blocks.to(DEVICE), 8)
    close(ob, o64, os_, EPS[torch.float32], "block out")


def test_dead_rows_zero_no_nan_and_duplicates():
    B, Tq, Tk, H, Hkv, d = 1, 5, 16, 4, 2, 8
    ts = make(B, Tq, Tk, H, Hkv, d, d)
    idx = torch.randint(0, Tk, (B, Tq, Hkv, 6), generator=torch.Generator().manual_seed(4))
    idx[:, 0] = -1  # nothing selected
    idx[:, 1] = 15  # only a future key
    idx[:, 2, :, 3:] = idx[:, 2, :, :3]  # duplicates
    compare(ts, idx)  # includes out == 0 and LSE == -inf on the dead rows (infinities must match)
    o = tk.sparse_attention_triton(*[t.to(DEVICE) for t in ts], idx.to(DEVICE))
    assert o[:, :2].abs().max().item() == 0
    compare(ts, idx[..., :0])  # K = 0: every row dead


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_half_precision(dtype):
    ts = make(1, 7, 64, 8, 2, 32, 32, dtype=dtype)
    idx = torch.randint(-1, 64, (1, 7, 2, 20), generator=torch.Generator().manual_seed(5))
    compare(ts, idx)
    bidx = torch.randint(-1, 4, (1, 7, 2, 2), generator=torch.Generator().manual_seed(6))
    compare(ts, bidx, 16, block=True, backward=False)


def test_dispatcher_picks_triton_and_fp64_falls_back():
    from attnzoo.ops.sparse import sparse_attention
    ts = make(1, 3, 12, 4, 2, 8, 8)
    idx = torch.randint(-1, 12, (1, 3, 2, 5), generator=torch.Generator().manual_seed(8))
    o = sparse_attention(*[t.to(DEVICE) for t in ts], idx.to(DEVICE), backend="triton")
    close(o, sparse_attention_reference(*[t.double() for t in ts], idx), sparse_attention_reference(*ts, idx),
          EPS[torch.float32], "dispatcher")
    o64 = tk.sparse_attention_triton(*[t.double() for t in ts], idx)  # fp64: torch form, same answer
    assert o64.dtype == torch.float64
    assert (o64 - sparse_attention_reference(*[t.double() for t in ts], idx)).abs().max() < 1e-12


def test_sparse_mla_absorbed_on_the_kernel():
    """DSA's absorbed sparse MLA (K = latent rows, V = their first dc dims, one head group) on the token
    kernel: output and the gradients of the query and the latent, against a float64 softmax over each
    query's rows (and the torch form's float32 error)."""
    from attnzoo.ops.latent.sparse import mla_sparse_absorbed
    g = torch.Generator().manual_seed(11)
    n, H, dc, dr, R, k = 13, 4, 24, 8, 40, 10
    q, lat = torch.randn(n, H, dc + dr, generator=g), torch.randn(R, dc + dr, generator=g)
    rows = torch.stack([torch.randperm(R, generator=g)[:k] for _ in range(n)])  # a top-k: distinct rows
    rows[0] = -1  # a query with nothing selected outputs 0
    rows[1, 4:] = -1
    go = torch.randn(n, H, dc, generator=g)

    def ref64(qq, ll):
        outs = []
        for i in range(n):
            r = rows[i][rows[i] >= 0]
            kv = ll[r]
            p = torch.softmax(qq[i] @ kv.T * 0.2, -1) if len(r) else kv.new_zeros(H, 0)
            outs.append(p @ kv[:, :dc] if len(r) else qq.new_zeros(H, dc))
        return torch.stack(outs)

    def run(fn, dtype, device):
        leaves = [q.to(device, dtype).requires_grad_(), lat.to(device, dtype).requires_grad_()]
        o = fn(*leaves)
        return [o, *torch.autograd.grad((o.double() * go.to(device).double()).sum(), leaves)]

    a = run(lambda x, y: mla_sparse_absorbed(x, y, rows.to(DEVICE), dc, 0.2, backend="triton"), torch.float32, DEVICE)
    b = run(ref64, torch.float64, "cpu")
    c = run(lambda x, y: mla_sparse_absorbed(x, y, rows, dc, 0.2, backend="torch"), torch.float32, "cpu")
    assert a[0][0].abs().max().item() == 0
    for name, x, y, z in zip(("out", "dq", "dlatent"), a, b, c):
        close(x, y, z, EPS[torch.float32], name)
