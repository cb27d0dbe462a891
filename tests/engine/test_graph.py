"""The compiled decode step (engine/graph.py): the same greedy tokens as the eager engine, with padded buckets,
a sliding-window/full hybrid with sinks and a value width of its own; a compiled step makes a handful of
Python calls whatever the model's depth; models it cannot serve stay eager and say why."""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch

from attnzoo.engine import LLM, SamplingParams
from attnzoo.engine.graph import ladder, unsupported
from attnzoo.models import DecoderLM, ModelConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def hybrid(layers: int = 2) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="llama", vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=layers,
                      num_heads=6, num_kv_heads=2, head_dim=8, v_head_dim=12, max_position_embeddings=256,
                      sliding_window=8, sliding_sinks=True,
                      layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    model = DecoderLM(cfg).eval()
    for n, p in model.named_parameters():
        if "norm" in n:
            p.data.uniform_(0.5, 1.5)
        else:
            p.data.normal_(0, 0.3)  # peaked logits: greedy continuations are not ties
    return model


def _engine(model: DecoderLM, eager: bool) -> LLM:
    return LLM(model, kv_cache_memory=1 << 20, page_size=4, max_num_seqs=4, enforce_eager=eager)


def test_ladder():
    assert ladder(1) == [1] and ladder(4) == [1, 2, 4] and ladder(6) == [1, 2, 4, 6]


def test_compiled_matches_eager():
    """Three requests decode as 3 rows (bucket 4: one padded row), then 2, then 1, each step on its compiled
    bucket; the tokens equal the eager engine's. Then the same requests with drafts (the known answer, one wrong
    token in every other proposal): verify steps (a sequence's last token and its drafts) run on the graph too,
    drafts are kept and rejected, and the tokens are still the eager engine's."""
    from tests.engine.test_speculative import AnswerDrafter
    model = hybrid()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (3, 17, 9)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (30, 20, 12)]
    expect = [o.outputs[0].token_ids for o in _engine(model, eager=True).generate(prompts, params)]
    llm = LLM(model, kv_cache_memory=1 << 20, page_size=4, max_num_seqs=4, enforce_eager=False,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2, "adaptive": False})
    graph = llm.runner.graph
    assert graph.sizes == [1, 2, 4, 8, 12]   # up to 4 sequences of 1 + 2 rows
    for size in graph.sizes:
        graph.compile(size)
    assert graph.failed is None and graph.compiled == set(graph.sizes)
    runs = []
    run = graph.run
    graph.run = lambda *a: runs.append(a[-1]) or run(*a)
    drafter, llm.drafter = llm.drafter, None
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expect
    assert set(runs) == {1, 2, 4}   # every decode step ran compiled, the 3-row ones padded to 4
    llm.drafter = AnswerDrafter(llm, {tuple(p): a for p, a in zip(prompts, expect)})
    llm.spec_stats.drafted = llm.spec_stats.accepted = 0
    runs.clear()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expect
    assert 0 < llm.spec_stats.accepted < llm.spec_stats.drafted
    assert max(runs) >= 8   # 3 sequences with drafts: 9 rows in bucket 12 (or 7 in 8)
    llm.check_integrity()


def test_compiled_step_makes_a_handful_of_python_calls():
    """The Python work of a compiled decode step is the buffer fill and one call, not a walk over the layers: no
    model or layer code runs, and the calls counted (ours, and torch's wrapper around the graph) are the same for
    2 and 6 layers."""
    ours, total = [], []
    for layers in (2, 6):
        llm = _engine(hybrid(layers), eager=False)
        llm.runner.graph.compile(1)
        llm.add_request([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        llm.step()
        llm.step()   # the first decode step: compiled
        inputs, _ = llm.runner.prepare(llm.scheduler.schedule())
        calls: Counter[str] = Counter()

        def count(frame, event, arg):
            if event == "call":
                calls[f"{frame.f_code.co_filename}:{frame.f_code.co_qualname}"] += 1
        sys.setprofile(count)
        try:
            llm.runner.execute(inputs)
        finally:
            sys.setprofile(None)
        mine = {k: n for k, n in calls.items() if f"{os.sep}attnzoo{os.sep}" in k}
        assert not [k for k in mine if f"{os.sep}layers{os.sep}" in k or f"{os.sep}models{os.sep}" in k], mine
        ours.append(sum(mine.values()))
        total.append(sum(calls.values()))
    assert ours[0] == ours[1] <= 20 and total[0] == total[1], (ours, total)


def test_unsupported_models_stay_eager():
    """MLA keeps latent rows, not K/V: the compiled step does not serve it, and the engine says so."""
    from attnzoo.mechanisms.latent import Config as MLA
    cfg = ModelConfig(architecture="deepseek_v3", vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=4, max_position_embeddings=256, attention_type="mla",
                      mla=MLA(q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
    llm = LLM(DecoderLM(cfg).eval(), kv_cache_memory=1 << 20, page_size=4, enforce_eager=False)
    assert llm.runner.graph is None
    assert "latent" in unsupported(llm.model, llm.runner.cache).lower()
