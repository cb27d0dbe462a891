"""SlidingKV in the engine: same greedy tokens as the reference, and pages that leave the window are
released while a long generation runs."""

from __future__ import annotations

import torch

from attnzoo.engine import LLM, GenerationConfig, SamplingParams, generate
from attnzoo.layers import SlidingKV
from attnzoo.models import DecoderLM, ModelConfig


def tiny_mistral(window: int) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="mistral", vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=window)
    model = DecoderLM(cfg).eval()
    for n, p in model.named_parameters():
        if "norm" in n:
            p.data.uniform_(0.5, 1.5)
        else:
            p.data.normal_(0, 0.3)  # large weights: peaked logits, so greedy continuations are not ties
    return model


def test_sliding_engine_matches_reference_and_frees_pages():
    model = tiny_mistral(window=8)
    assert model.cache_specs() == [SlidingKV(2, 8, window=8)] * 2
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (3, 17, 40, 9)]
    refs = [generate(model, p, GenerationConfig(max_tokens=60)) for p in prompts]
    llm = LLM(model, kv_cache_memory=1 << 20, page_size=4, max_num_batched_tokens=16)
    assert llm.kv.radix is not None and llm.kv.tables[0].keys_only  # a bookkeeping table keys the tree
    pool = llm.kv.groups[0].pool
    for p in prompts:
        llm.add_request(p, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    outs, peak = {}, 0
    while llm.has_unfinished():
        for o in llm.step():
            if o.finished:
                outs[o.request_id] = o
        llm.check_integrity()
        t, held = llm.kv.groups[0].table, set()
        for r in llm.scheduler.running:  # each sequence holds at most the pages its window can touch
            live = [q for q in r.page_tables[t] if q >= 0]   # (from the window's last page boundary)
            assert len(live) <= -(-8 // 4) + 2, (r.request_id, r.num_computed, r.page_tables[t])
            held.update(live)
        peak = max(peak, len(held))
    assert [outs[str(i)].token_ids for i in range(4)] == refs
    assert peak <= 4 * (-(-8 // 4) + 2) + 4  # bounded by the window, not by the 100-token sequences
    llm.clear_prefix_cache()  # the tree kept each finished sequence's last window
    assert pool.num_free == pool.capacity
