"""Native Sparse Attention through the paged engine: raw K/V rows per token and one compressed row per
completed block (appended as blocks complete); every step's logits equal the model's own full-sequence
forward on the same tokens (the one-pass path, itself tested against the float64 paper loop in
tests/ops/test_nsa.py), token by token past several compression and selection block boundaries,
batched with other requests, in chunks, with the prefix cache on and off."""

from __future__ import annotations

import pytest
import torch

from attnzoo.arena import mechanisms
from attnzoo.engine import LLM, SamplingParams
from attnzoo.layers.cache_spec import CompressedKV, RowKV
from attnzoo.models import DecoderLM

NEW = 64


@pytest.fixture(scope="module", params=["paper", "fla"])
def model(request) -> DecoderLM:
    shape = mechanisms.Shape(vocab_size=101, hidden=32, layers=2, heads=4, head_dim=8, intermediate=64,
                             seq_len=64, max_positions=512)
    cfg = mechanisms.nsa(shape)   # compression blocks of 4 tokens, stride 2; 4 selected blocks of 4; window 16
    if request.param == "fla":    # shared K/V, mean pooling, l == d == l_sel
        cfg.nsa.shared_kv, cfg.nsa.compress, cfg.nsa.stride = True, "mean", cfg.nsa.block_len
    torch.manual_seed(0)
    m = DecoderLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.3)  # noqa: B018 (peaked logits)
    return m


def full_logprobs(model: DecoderLM, ids: list[int]) -> torch.Tensor:
    """Log-probabilities of every next token from one full pass over ids: [len(ids), V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


def test_cache_specs(model) -> None:
    nsa = model.layers[0].attn
    rows, cmp = nsa.cache_spec()
    width = 2 * nsa.num_kv_heads * nsa.head_dim
    assert rows == RowKV(nsa.kv_sets * width) and cmp == CompressedKV(width, nsa.block_len, nsa.stride)
    assert cmp.rows_per_page(16) == -(-16 // nsa.stride) and cmp.bytes_per_page(16, 4) < rows.bytes_per_page(16, 4)


@pytest.mark.parametrize("prefix_caching, chunk", [(True, 2048), (False, 7)])
def test_engine_equals_full_recomputation(model, prefix_caching, chunk) -> None:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (9, 30, 3, 17)]
    prompts.append(prompts[1][:24] + [5, 6, 7])   # shares 24 tokens with another: a prefix-cache hit
    llm = LLM(model, page_size=4, kv_cache_memory=4 << 20, max_num_batched_tokens=chunk, max_num_seqs=8,
              enable_prefix_caching=prefix_caching)
    groups = {g.spec: g for g in llm.kv.groups}
    assert set(groups) == set(model.layers[0].attn.cache_spec())
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.check_integrity()
    for p, o in zip(prompts, outs):
        ids = p + o.token_ids
        lp = full_logprobs(model, ids)
        for i, tok in enumerate(o.token_ids):   # greedy: the full pass agrees on every choice and its logprob
            row = lp[len(p) - 1 + i]
            assert int(row.argmax()) == tok, (len(p), i)
            assert abs(o.outputs[0].logprobs[i][tok] - float(row[tok])) < 1e-4
    if prefix_caching:
        assert outs[-1].cached_tokens == 24
    llm.clear_prefix_cache()
    assert all(t.pool.num_free == t.pool.capacity for t in llm.kv.tables)
