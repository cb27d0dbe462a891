"""Select-then-attend (attnzoo.ops.sparse): torch form vs the reference, dense equivalence, selectors vs
transformers' indexers (and fla's NSA top-k when FLA_PATH is set), the indexer KL losses, the cost model.

Tolerances: float64 everywhere the forms should agree to rounding (1e-10); bf16 / fp32 by the rule of
test_attention.py (error <= 2 * the same-dtype reference's error + eps)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnzoo.ops.attention import attention
from attnzoo.ops.sparse import (
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_torch,
    blocks_to_token_indices,
    sparse_attention,
    sparse_attention_reference,
    sparse_attention_torch,
)
from attnzoo.ops.sparse import cost
from attnzoo.ops.sparse.kl import indexer_kl_loss, kl_rows, msa_indexer_kl_loss
from attnzoo.ops.sparse.select import (
    lightning_indexer_scores,
    msa_block_scores,
    msa_select_blocks,
    nsa_block_scores,
    nsa_block_scores_fla,
    nsa_select_blocks,
    topk_indices,
)

# Tiny transformers configs for the indexer checks: sequences of 24 tokens exceed index_topk (8) and hold 6
# index blocks of 4 against a top-2 budget, so both selections are really sparse.
DSA_CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=12, index_topk=8, index_head_dim=16, index_n_heads=4, n_routed_experts=4,
    num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=256,
    attn_implementation="eager", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MSA_CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=32, dense_intermediate_size=128, shared_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
    num_experts_per_tok=2, max_position_embeddings=256, index_n_heads=2, index_head_dim=16, index_block_size=4,
    index_topk_blocks=2, index_local_blocks=1, layer_types=["full_attention", "minimax_m3_sparse"],
    mlp_layer_types=["dense", "sparse"],
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
    pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")


def rand(*shape: int, g: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def problem(B: int, Tq: int, Tk: int, H: int, Hkv: int, d: int, dv: int, K: int, seed: int = 0,
            dtype: torch.dtype = torch.float64, lo: int = -1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(B, Tq, H, d, g=g, dtype=dtype), rand(B, Tk, Hkv, d, g=g, dtype=dtype), rand(B, Tk, Hkv, dv, g=g, dtype=dtype)
    idx = torch.randint(lo, Tk, (B, Tq, Hkv, K), generator=g)  # -1 padding, duplicates and future keys included
    return q, k, v, idx


def run(fn, q, k, v, sel, *args, lse_w=None, **kw):  # type: ignore[no-untyped-def]
    """(out, lse, grads) of loss = sum(out * w_out) + sum(finite lse * lse_w)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves, sel, *args, return_lse=True, **kw)
    g = torch.Generator().manual_seed(3)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    if lse_w is not False:
        w = torch.randn(lse.shape, generator=g, dtype=torch.float64)
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0).double() * w).sum()
    loss.backward()
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10, what: str = "") -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert not a.isnan().any() and not b.isnan().any(), f"{what}: NaN"
    inf = torch.isinf(b)
    assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], b[inf]), f"{what}: infinite entries differ"
    if (~inf).any():
        err = (a.double() - b.double())[~inf].abs().max().item()
        assert err <= tol * max(1.0, b[~inf].abs().max().item()), f"{what}: {err:.3g}"


CASES = [  # B, Tq, Tk, H, Hkv, d, dv, K
    (2, 37, 100, 8, 2, 16, 12, 24),  # awkward sizes, GQA 4
    (1, 1, 100, 4, 1, 16, 16, 40),  # decode, MQA (DSA layout)
    (2, 16, 16, 2, 2, 8, 8, 5),  # MHA, Tq == Tk
    (1, 9, 30, 4, 2, 8, 8, 64),  # K > Tk: surplus slots must be -1 / duplicates
]


@pytest.mark.parametrize("case", CASES)
def test_torch_matches_reference_fp64(case):
    q, k, v, idx = problem(*case)
    ref = run(sparse_attention_reference, q, k, v, idx)
    got = run(sparse_attention_torch, q, k, v, idx, chunk=4)  # several chunks: exercises checkpointing
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
        same(a, b, what=name)


@pytest.mark.parametrize("case", CASES[:2])
def test_block_torch_matches_reference_and_token_form(case):
    B, Tq, Tk, H, Hkv, d, dv, _ = case
    q, k, v, _ = problem(*case)
    bs = 8
    g = torch.Generator().manual_seed(5)
    bidx = torch.randint(-1, -(-Tk // bs), (B, Tq, Hkv, 5), generator=g)  # last block of 100 keys is partial
    ref = run(block_sparse_attention_reference, q, k, v, bidx, bs)
    got = run(block_sparse_attention_torch, q, k, v, bidx, bs, chunk=3)
    tok = run(sparse_attention_reference, q, k, v, blocks_to_token_indices(bidx, bs, Tk))
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), (got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2]),
                             (tok[0], tok[1], *tok[2])):
        same(a, b, what=name)
        same(c, b, what=name + " (token form)")


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("Tq,Tk,extra", [(20, 33, 0), (7, 50, 9), (1, 41, 3), (33, 33, 0)])
def test_all_keys_selected_equals_dense_attention(G, Tq, Tk, extra):
    """top-k >= context: every causal key selected (random slot order, -1 padding, duplicates) == dense."""
    B, Hkv, d = 2, 2, 16
    q, k, v, _ = problem(B, Tq, Tk, Hkv * G, Hkv, d, 12, 1)
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(Tk, generator=g) for _ in range(B * Tq * Hkv)]).view(B, Tq, Hkv, Tk)
    pad = torch.randint(-1, Tk, (B, Tq, Hkv, extra), generator=g)  # -1s and repeats of selected keys
    idx = torch.cat([perm, pad], -1)
    dense, dense_lse = attention(q, k, v, causal=True, return_lse=True)  # the default (torch) backend
    for fn in (sparse_attention_reference, sparse_attention_torch):
        out, lse = fn(q, k, v, idx, return_lse=True)
        same(out, dense, what=fn.__name__)
        same(lse, dense_lse, what=fn.__name__ + " lse")
    bs = 8
    nblk = -(-Tk // bs)
    allb = torch.arange(nblk).flip(0).expand(B, Tq, Hkv, nblk)
    for fn in (block_sparse_attention_reference, block_sparse_attention_torch):
        same(fn(q, k, v, allb, bs), dense, what=fn.__name__)
    # and through the public dispatchers
    same(sparse_attention(q, k, v, idx), dense, what="dispatcher")
    same(block_sparse_attention(q, k, v, allb, bs), dense, what="block dispatcher")


def test_duplicates_count_once():
    q, k, v, idx = problem(2, 11, 40, 4, 2, 8, 8, 6, lo=0)
    dup = torch.cat([idx, idx[..., :3], idx[..., :1]], -1)  # some keys named two or three times
    for fn in (sparse_attention_reference, sparse_attention_torch):
        same(fn(q, k, v, dup), fn(q, k, v, idx), what=fn.__name__)
    bidx = torch.tensor([2, 0, 2, 1, 0]).expand(2, 11, 2, 5)
    for fn in (block_sparse_attention_reference, block_sparse_attention_torch):
        same(fn(q, k, v, bidx, 8), fn(q, k, v, bidx[..., [0, 1, 3]], 8), what=fn.__name__)


def test_rows_with_nothing_valid_give_zero_and_no_nan():
    q, k, v, idx = problem(1, 6, 20, 4, 2, 8, 8, 5, lo=0)
    idx[:, 0] = -1  # all padding
    idx[:, 1] = 19  # only a future key (query 1 sits at key 15)
    idx[:, 2, 0] = -1  # group 0 only
    for fn in (sparse_attention_reference, sparse_attention_torch):
        out, lse, grads = run(fn, q, k, v, idx)
        assert out[:, :2].abs().max() == 0 and out[:, 2, :2].abs().max() == 0
        assert torch.isneginf(lse[:, :, :2]).all() and torch.isneginf(lse[:, :2, 2]).all()
        assert torch.isfinite(lse[:, 2:, 2]).all()
        for gr in grads:
            assert torch.isfinite(gr).all()
        assert grads[0][:, :2].abs().max() == 0
    empty = idx[..., :0]  # K = 0
    out, lse = sparse_attention_torch(q, k, v, empty, return_lse=True)
    assert out.abs().max() == 0 and torch.isneginf(lse).all()
    for fn in (sparse_attention_reference, sparse_attention_torch):  # an empty cache: only -1 is legal
        out, lse = fn(q, k[:, :0], v[:, :0], torch.full_like(idx, -1), return_lse=True)
        assert out.abs().max() == 0 and torch.isneginf(lse).all()


def test_not_causal_can_read_future_keys():
    q, k, v, idx = problem(1, 5, 20, 4, 2, 8, 8, 6)
    a, b = sparse_attention_reference(q, k, v, idx, causal=False), sparse_attention_torch(q, k, v, idx, causal=False)
    same(b, a)
    dense = attention(q, k, v, causal=False, backend="reference")
    same(sparse_attention_torch(q, k, v, torch.arange(20).expand(1, 5, 2, 20), causal=False), dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_reference_error(dtype):
    q, k, v, idx = problem(2, 13, 60, 8, 2, 16, 16, 20, dtype=dtype)
    o64 = sparse_attention_reference(q.double(), k.double(), v.double(), idx)
    o_ref = sparse_attention_reference(q, k, v, idx)
    o = sparse_attention_torch(q, k, v, idx)
    assert o.dtype == dtype
    base = (o_ref.double() - o64).abs().max().item()
    assert (o.double() - o64).abs().max().item() <= 2 * base + {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]


def test_strided_views_are_read_in_place():
    """MLA layout: values are the first dv dims of the cached latent (a strided view)."""
    g = torch.Generator().manual_seed(0)
    lat = rand(1, 30, 1, 24, g=g)
    q = rand(1, 4, 8, 24, g=g)
    idx = torch.randint(-1, 30, (1, 4, 1, 10), generator=g)
    same(sparse_attention_torch(q, lat, lat[..., :16], idx), sparse_attention_reference(q, lat, lat[..., :16], idx))
    # head-major storage seen as [B, T, Hkv, d]: rows do not merge into one view (advanced-indexing path)
    k = rand(2, 3, 30, 8, g=g).transpose(1, 2)
    q, idx = rand(2, 4, 6, 8, g=g), torch.randint(-1, 30, (2, 4, 3, 7), generator=g)
    same(sparse_attention_torch(q, k, k, idx), sparse_attention_reference(q, k, k, idx))


def test_bad_arguments_are_clear_value_errors():
    q, k, v, idx = problem(1, 4, 10, 4, 2, 8, 8, 3, lo=0)
    bad = [
        (lambda: sparse_attention(q, k, v, idx.clone().fill_(10)), "must lie in"),
        (lambda: sparse_attention(q, k, v, idx.clone().fill_(-2)), "must lie in"),
        (lambda: sparse_attention(q, k, v, idx[:, :, :1]), "indices must be"),
        (lambda: sparse_attention(q, k, v, idx[0]), "indices must be"),
        (lambda: sparse_attention(q, k, v, idx.double()), "integer"),
        (lambda: sparse_attention(q[..., :3, :], k, v, idx), "multiple of kv heads"),
        (lambda: sparse_attention(q, k[..., :4], v, idx), "head dims differ"),
        (lambda: sparse_attention(q, k, v[:, :5], idx), "share"),
        (lambda: sparse_attention(q, k.float(), v, idx), "dtype"),
        (lambda: block_sparse_attention(q, k, v, idx.clone().fill_(3), 4), "must lie in"),  # ceil(10/4) = 3 blocks
        (lambda: block_sparse_attention(q, k, v, idx.clamp(max=1), 0), "block_size"),
        (lambda: sparse_attention(q, k, v, idx, backend="nope"), "unknown sparse attention backend"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()
    block_sparse_attention(q, k, v, idx.clamp(max=2), 4)  # the largest legal block id is fine


# ------------------------------------------------------------------------------------------ selectors

def test_lightning_indexer_scores_and_topk_match_the_formula():
    g = torch.Generator().manual_seed(0)
    B, Tq, Tk, HI, dI = 2, 5, 9, 3, 4
    qi, ki, w = rand(B, Tq, HI, dI, g=g), rand(B, Tk, dI, g=g), rand(B, Tq, HI, g=g)
    I = lightning_indexer_scores(qi, ki, w, scale=0.5)
    for b in range(B):
        for t in range(Tq):
            for s in range(Tk):
                want = sum(w[b, t, h] * max(0.0, 0.5 * float(qi[b, t, h] @ ki[b, s])) for h in range(HI))
                if s > t + Tk - Tq:
                    assert I[b, t, s] == float("-inf")
                else:
                    assert abs(I[b, t, s] - want) < 1e-12
    top = topk_indices(I, 6)
    assert top.shape == (B, Tq, 6) and top.dtype == torch.int64
    for t in range(Tq):
        n_valid = t + Tk - Tq + 1
        row = top[0, t]
        assert (row >= 0).sum() == min(6, n_valid) and (row[row < 0] == -1).all()
        assert set(row[row >= 0].tolist()) == set(I[0, t].topk(min(6, n_valid)).indices.tolist())
    assert (topk_indices(I, 20)[..., Tk:] == -1).all()  # wider than the key axis: padded


def test_msa_block_scores_match_a_loop():
    g = torch.Generator().manual_seed(0)
    B, Tq, Tk, G, dI, bs = 1, 6, 23, 2, 4, 4
    qi, ki = rand(B, Tq, G, dI, g=g), rand(B, Tk, dI, g=g)
    U = msa_block_scores(qi, ki, bs, local_blocks=2)
    nb = 6
    assert U.shape == (B, G, Tq, nb)
    for gg in range(G):
        for t in range(Tq):
            a = t + Tk - Tq
            for n in range(nb):
                keys = [s for s in range(n * bs, min((n + 1) * bs, Tk)) if s <= a]
                if n in (a // bs, a // bs - 1):
                    want = float("inf")
                else:
                    want = max((float(qi[0, t, gg] @ ki[0, s]) for s in keys), default=float("-inf"))
                assert U[0, gg, t, n] == want or abs(U[0, gg, t, n] - want) < 1e-12
    sel = msa_select_blocks(U, 4)
    assert sel.shape == (B, Tq, G, 4)
    assert {int(x) for x in sel[0, 0, 0]} >= {(Tk - Tq) // bs}  # own block always kept


@pytest.mark.parametrize("l,d,l_sel,nsel", [(32, 16, 64, None), (32, 16, 64, 4), (16, 16, 64, 3), (64, 16, 32, 6)])
def test_nsa_block_scores_match_the_paper_formula(l, d, l_sel, nsel):
    g = torch.Generator().manual_seed(0)
    B, Tq, H, G, Nc = 1, 3, 4, 2, 9
    p = torch.rand(B, Tq, H, Nc, generator=g, dtype=torch.float64)
    got = nsa_block_scores(p, G=G, l=l, d=d, l_sel=l_sel, num_blocks=nsel)
    n_want = -(-((Nc - 1) * d + l) // l_sel) if nsel is None else nsel
    assert got.shape == (B, Tq, H // G, n_want)
    r, c = l_sel // d, l // d
    for j in range(n_want):
        want = torch.zeros(B, Tq, H, dtype=torch.float64)
        for m in range(r):
            for n in range(c):
                if 0 <= r * j - m - n < Nc:
                    want += p[..., r * j - m - n]
        same(got[..., j], want.view(B, Tq, H // G, G).sum(-1), what=f"block {j}")


def test_nsa_block_scores_identity_and_fla_mean():
    p = torch.rand(1, 3, 4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    same(nsa_block_scores(p, G=2, l=16, d=16, l_sel=16), p.view(1, 3, 2, 2, 9).sum(3))  # l = d = l': identity
    same(nsa_block_scores_fla(p, G=2), p.view(1, 3, 2, 2, 9).mean(3))


def test_nsa_select_blocks_forces_initial_and_local():
    B, Tq, Hkv, nsel, bs = 1, 4, 2, 10, 16
    scores = torch.rand(B, Tq, Hkv, nsel, generator=torch.Generator().manual_seed(0))
    sel = nsa_select_blocks(scores, 4, block_size=bs, kv_len=160)  # queries at keys 156..159: own block 9
    for t in range(Tq):
        for h in range(Hkv):
            s = set(sel[0, t, h].tolist())
            assert {0, 9, 8} <= s and len(s) == 4
            rest = (s - {0, 8, 9}).pop()
            assert rest == int(scores[0, t, h, 1:8].argmax()) + 1
    early = nsa_select_blocks(scores, 4, block_size=bs, kv_len=Tq)  # keys 0..3: only block 0 exists
    assert (early[..., 0] == 0).all() and (early[..., 1:] == -1).all()


def _topk_sets_agree(scores: torch.Tensor, mine: torch.Tensor, theirs: torch.Tensor, k: int) -> int:
    """Compare per-row selections as sets, skipping rows where the k-th and (k+1)-th scores tie.
    scores [R, N], mine/theirs [R, *] with -1 (or out-of-range) entries ignored. Returns rows checked."""
    checked = 0
    for r in range(scores.shape[0]):
        fin = scores[r][scores[r] > float("-inf")]
        if fin.numel() > k:
            top = fin.sort(descending=True).values
            if top[k - 1] == top[k]:
                continue
        a = {int(x) for x in mine[r] if x >= 0}
        b = {int(x) for x in theirs[r] if x >= 0}
        assert a == b, (r, sorted(a), sorted(b))
        checked += 1
    return checked


def _indexer_call(model: torch.nn.Module) -> tuple:
    """(args, kwargs, output) of layer 1's indexer on one fixed batch of 2 x 24 tokens."""
    got: dict = {}

    def keep(m, a, kw, o):  # type: ignore[no-untyped-def]
        got.setdefault("o", (a, kw, o))  # returns None: the module's output is left alone
    h = model.model.layers[1].self_attn.indexer.register_forward_hook(keep, with_kwargs=True)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return got["o"]


def test_dsa_selection_matches_transformers_indexer():
    pytest.importorskip("transformers")
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**DSA_CONFIG)).eval()
    attn = model.model.layers[1].self_attn
    idx = attn.indexer
    with torch.no_grad():  # LayerNorm starts as weight 1, bias 0: randomise so the check sees them
        idx.k_norm.weight.normal_(1.0, 0.5)
        idx.k_norm.bias.normal_(0.0, 0.5)
    (x, q_resid, (cos, sin), *_), _, top = _indexer_call(model)
    B, T, _ = x.shape
    HI, dI, r = idx.n_heads, idx.head_dim, idx.qk_rope_head_dim
    with torch.no_grad():  # q_I, k_I as the module builds them, then OUR scoring
        qi = idx.wq_b(q_resid).view(B, T, HI, dI)
        ki = F.layer_norm(idx.wk(x), (dI,), idx.k_norm.weight, idx.k_norm.bias, 1e-6)

        def rot(t, c, s):  # type: ignore[no-untyped-def]  # half-split rope on the first r dims
            a, b = t[..., : r // 2], t[..., r // 2: r]
            return torch.cat([t[..., :r] * c + torch.cat([-b, a], -1) * s, t[..., r:]], -1)
        qi, ki = rot(qi, cos[:, :, None], sin[:, :, None]), rot(ki, cos, sin)
        w = idx.weights_proj(x) * HI ** -0.5  # transformers folds HI**-0.5 into the weights
        I = lightning_indexer_scores(qi, ki, w, scale=dI ** -0.5)
        mine = topk_indices(I, idx.index_topk)
    theirs = top.long()
    theirs = theirs.masked_fill(theirs > torch.arange(T)[None, :, None], -1)  # HF keeps future picks of short rows
    n = _topk_sets_agree(I.flatten(0, 1), mine.flatten(0, 1), theirs.flatten(0, 1), idx.index_topk)
    assert n >= 0.9 * B * T, f"only {n} of {B * T} rows were tie-free"


def test_msa_selection_matches_transformers_indexer():
    pytest.importorskip("transformers")
    from transformers import MiniMaxM3VLForCausalLM, MiniMaxM3VLTextConfig
    torch.manual_seed(0)
    model = MiniMaxM3VLForCausalLM(MiniMaxM3VLTextConfig(**MSA_CONFIG)).eval()
    idx = model.model.layers[1].self_attn.indexer
    with torch.no_grad():  # zero-centred (1 + w) RMSNorm weights start at 0: randomise
        idx.q_norm.weight.normal_(0.0, 0.5)
        idx.k_norm.weight.normal_(0.0, 0.5)
    (x, (cos, sin), *_), _, blocks = _indexer_call(model)
    B, T, _ = x.shape
    G, dI, bs, k = idx.num_heads, idx.head_dim, idx.block_size, idx.topk_blocks
    with torch.no_grad():
        qi = idx.q_norm(idx.q_proj(x).view(B, T, G, dI))
        ki = idx.k_norm(idx.k_proj(x).view(B, T, dI))
        rr = cos.shape[-1]

        def rot(t, c, s):  # type: ignore[no-untyped-def]
            a, b = t[..., : rr // 2], t[..., rr // 2: rr]
            return torch.cat([t[..., :rr] * c + torch.cat([-b, a], -1) * s, t[..., rr:]], -1)
        qi, ki = rot(qi, cos[:, :, None], sin[:, :, None]), rot(ki, cos, sin)
        U = msa_block_scores(qi, ki, bs, local_blocks=idx.local_blocks)  # [B, G, T, nb]
        mine = msa_select_blocks(U, k)  # [B, T, G, k]
    n = _topk_sets_agree(U.flatten(0, 2), mine.transpose(1, 2).flatten(0, 2), blocks.flatten(0, 2), k)
    assert n >= 0.9 * B * G * T


NSA_FLA_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import fla.ops.nsa.naive as fla_nsa
from fla.ops.nsa.naive import naive_nsa_topk
from attnzoo.ops.sparse.select import nsa_compression_probs, nsa_block_scores_fla, nsa_select_blocks
torch.manual_seed(0)
B, T, Hkv, G, D, BS, S = 2, 67, 2, 16, 32, 8, 4
q, k = torch.randn(B, T, Hkv * G, D), torch.randn(B, T, Hkv, D)
n = -(-T // BS)
pad = torch.zeros(B, n * BS - T, Hkv, D)
cnt = torch.clamp(T - torch.arange(n) * BS, max=BS).float()
k_cmp = torch.cat([k, pad], 1).view(B, n, BS, Hkv, D).sum(2) / cnt.view(1, n, 1, 1)   # mean pooling
theirs = naive_nsa_topk(q, k_cmp, S, BS, D ** -0.5)
p = nsa_compression_probs(q, k_cmp, l=BS, d=BS, scale=D ** -0.5)
mine = nsa_select_blocks(nsa_block_scores_fla(p, G=G), S, block_size=BS)
a = [sorted(x for x in r if x >= 0) for r in mine.flatten(0, 2).tolist()]
b = [sorted(x for x in r if x >= 0) for r in theirs.flatten(0, 2).tolist()]
print("rows", len(a), "agree", sum(x == y for x, y in zip(a, b)))
"""


def test_nsa_fla_variant_matches_fla_naive_topk():
    """fla-core is kept off this process's path (it rebinds transformers' GDN/KDA kernels): a subprocess."""
    fla = os.environ.get("FLA_PATH")
    if not fla or not Path(fla, "fla").is_dir():
        pytest.skip("set FLA_PATH to a directory with fla-core (pip install --no-deps --target DIR fla-core einops)")
    r = subprocess.run([sys.executable, "-c", NSA_FLA_SCRIPT, fla], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.split()
    assert last[-3] == last[-1], r.stdout  # every row agrees


# ------------------------------------------------------------------------------------------------ KL

def _kl_direct(target: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 textbook KL over the masked set: sum p * (log p - log q)."""
    total = logits.new_zeros(())
    for idx in torch.nonzero(mask.any(-1)).tolist():
        m = mask[tuple(idx)]
        lq = logits[tuple(idx)][m] - torch.logsumexp(logits[tuple(idx)][m], 0)
        p = target[tuple(idx)][m]
        total = total + torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - lq), 0).sum()
    return total


def test_dsa_indexer_kl_gradients_match_direct_formula():
    g = torch.Generator().manual_seed(0)
    B, T, H, d, HI, dI, K = 1, 9, 4, 8, 3, 4, 4
    q, k = rand(B, T, H, d, g=g), rand(B, T, 1, d, g=g)
    qi, ki, w = rand(B, T, HI, dI, g=g).requires_grad_(), rand(B, T, dI, g=g).requires_grad_(), rand(B, T, HI, g=g)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for selected in (None, "topk"):
        I = lightning_indexer_scores(qi, ki, w, scale=dI ** -0.5)
        sel = topk_indices(I.detach(), K) if selected else None
        loss = indexer_kl_loss(I, q=q, k=k, selected=sel)
        gq, gk = torch.autograd.grad(loss, (qi, ki))
        # direct: teacher = normalised head-sum of the (sparse) main attention over the allowed keys
        allowed = causal[None].clone()
        if sel is not None:
            picked = torch.zeros(B, T, T, dtype=torch.bool)
            for t in range(T):
                picked[0, t, [x for x in sel[0, t].tolist() if x >= 0]] = True
            allowed &= picked
        s = torch.einsum("bthd,bsd->bths", q, k[:, :, 0]) * d ** -0.5
        P = torch.softmax(s.masked_fill(~allowed[:, :, None], float("-inf")), -1).sum(2)
        P = P / P.sum(-1, keepdim=True)
        I2 = torch.einsum("bth,bths->bts", w, torch.relu(torch.einsum("bthd,bsd->bths", qi, ki) * dI ** -0.5))
        want = _kl_direct(P, I2, allowed)
        wq, wk = torch.autograd.grad(want, (qi, ki))
        assert abs(loss.item() - want.item()) < 1e-10 and loss.item() >= 0
        same(gq, wq, what="dq_I")
        same(gk, wk, what="dk_I")
    # main_probs [B, H, Tq, Tk] gives the same loss as q/k
    P4 = torch.softmax((torch.einsum("bthd,bsd->bhts", q, k[:, :, 0]) * d ** -0.5).masked_fill(~causal, float("-inf")), -1)
    I = lightning_indexer_scores(qi, ki, w, scale=dI ** -0.5)
    same(indexer_kl_loss(I, main_probs=P4), indexer_kl_loss(I, q=q, k=k), what="main_probs vs q/k")


def test_kl_is_nonnegative_and_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    logits = rand(3, 5, 7, g=g)
    mask = torch.rand(3, 5, 7, generator=g) > 0.4
    mask[0, 0] = False  # an empty row contributes 0
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    kl = kl_rows(p, logits, mask)
    assert kl.abs().max() < 1e-12
    other = torch.softmax(rand(3, 5, 7, g=g).masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    assert (kl_rows(other, logits, mask) >= -1e-12).all()
    # DSA: an indexer whose scores are the log of the teacher has zero loss
    T = 6
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax(rand(1, 2, T, T, g=g).masked_fill(~causal, float("-inf")), -1)
    target = probs.sum(1) / probs.sum(1).sum(-1, keepdim=True)
    assert abs(indexer_kl_loss(torch.log(target), main_probs=probs).item()) < 1e-12


def test_msa_kl_closed_form_gradient_and_direct_formula():
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, d, dI, bs = 2, 13, 4, 2, 8, 4, 4
    q, k = rand(B, T, H, d, g=g), rand(B, T, Hkv, d, g=g)
    qi, ki = rand(B, T, Hkv, dI, g=g).requires_grad_(), rand(B, T, dI, g=g).requires_grad_()
    U = msa_block_scores(qi.detach(), ki.detach(), bs)
    blocks = msa_select_blocks(U, 2)
    coeff = 0.7
    loss = msa_indexer_kl_loss(q, k, qi, ki, blocks, bs, loss_coeff=coeff)
    assert loss.item() >= 0
    # direct float64 formula
    ok = blocks_to_token_indices(blocks, bs, T)
    M = torch.zeros(B, T, Hkv, T + 1, dtype=torch.bool).scatter(-1, torch.where(ok < 0, T, ok), True)[..., :T]
    M &= torch.ones(T, T, dtype=torch.bool).tril()[None, :, None]
    s = torch.einsum("bthd,bshd->bths", q, k.repeat_interleave(H // Hkv, 2)) * d ** -0.5
    PT = torch.softmax(s.masked_fill(~M.repeat_interleave(H // Hkv, 2), float("-inf")), -1)
    PT = PT.view(B, T, Hkv, H // Hkv, T).mean(3)
    logits = torch.einsum("btgd,bsd->btgs", qi, ki) * dI ** -0.5
    factor = coeff / (Hkv * B * T)
    want = factor * _kl_direct(PT, logits, M)
    assert abs(loss.item() - want.item()) < 1e-12
    for a, b in zip(torch.autograd.grad(loss, (qi, ki)), torch.autograd.grad(want, (qi, ki))):
        same(a, b)
    # closed form: d loss / d logits_S = (P_S - P_T) * factor on the allowed keys, 0 elsewhere
    lg = logits.detach().requires_grad_()
    kl = factor * kl_rows(PT, lg, M).sum()
    (dl,) = torch.autograd.grad(kl, lg)
    PS = torch.softmax(lg.detach().masked_fill(~M, float("-inf")), -1)
    same(dl, torch.where(M, (PS - PT) * factor, 0.0), what="closed form")


# ---------------------------------------------------------------------------------------- cost model

def test_cost_model_gqa_and_mla_by_hand():
    gqa = cost.CostShape("tiny gqa", hidden=32, layers=1, heads=4, kv_heads=2, head_dim=8, v_head_dim=6)
    c = cost.cost_per_token("gqa", 10, gqa)
    assert c.parts["attn"] == 2 * 4 * 10 * (8 + 6)  # scores + values, every head, 10 keys
    assert c.kv_bytes == 10 * 2 * (8 + 6) * 2  # 10 rows of 2 KV heads, bf16
    assert c.parts["proj"] == 2 * 32 * (4 * 8 + 2 * 14) + 2 * 4 * 6 * 32
    assert cost.flops_per_token("gqa", 10, gqa, mode="prefill") == 2 * 4 * 5.5 * 14  # mean of 1..10 keys
    mla = cost.CostShape("tiny mla", hidden=32, layers=1, heads=2, v_head_dim=5, kv_lora_rank=4,
                           qk_nope_head_dim=3, qk_rope_head_dim=2)
    c = cost.cost_per_token("mla", 10, mla)
    assert c.parts["attn"] == 2 * 2 * 10 * (4 + 2 + 4)  # scores over r + dr, values over r
    assert c.parts["absorb"] == 2 * 2 * (3 * 4 + 4 * 5)
    assert c.kv_bytes == 10 * (4 + 2) * 2
    assert cost.flops_per_token("mla", 10, mla) == c.parts["attn"] + c.parts["absorb"]
    # DSA below the top-k is MLA plus the indexer
    dsa = cost.CostShape("tiny dsa", hidden=32, layers=1, heads=2, v_head_dim=5, kv_lora_rank=4, qk_nope_head_dim=3,
                           qk_rope_head_dim=2, index_heads=3, index_dim=4, index_topk=16)
    assert cost.flops_per_token("dsa", 10, dsa) == cost.flops_per_token("mla", 10, mla) + 2 * 3 * 10 * 5
    assert cost.cost_per_token("dsa", 100, dsa).parts["attn"] == 2 * 2 * 16 * 10


def test_cost_model_reproduces_the_nsa_memory_table():
    # NSA paper Table 4: 65536 / 5632 = 11.6x expected decode speedup at 64k
    r = cost.claim_ratios(cost.CLAIMS[2])["decode bytes"]
    assert math.isclose(r, 11.6, rel_tol=5e-3)
    assert math.isclose(cost.claim_ratios(cost.CLAIMS[0])["prefill core"], 28.4, rel_tol=5e-3)
