"""Tensor parallelism on the CPU (gloo, 2 processes): greedy tokens of tensor_parallel_size=2 equal those of one
process (fp32) for each family the sharding rules split, and with a hybrid's prefix cache hitting its state
snapshots; a killed worker fails the engine cleanly; an engine
that is only dropped stops its workers and frees the process group for the next one."""

from __future__ import annotations

import gc
import os
import signal
import weakref
from multiprocessing.connection import wait
from pathlib import Path

import pytest
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402

from attnzoo.engine import LLM, EngineDeadError, SamplingParams  # noqa: E402
from attnzoo.engine.cache_tensors import RestoreState, SaveState, ZeroPages, ZeroState  # noqa: E402
from attnzoo.models import load_model  # noqa: E402
from attnzoo.models.hf_loader import config_from_hf  # noqa: E402
from attnzoo.models.sharding import check_tensor_parallel  # noqa: E402

from tests.hf_oracle import random_prompts  # noqa: E402

NEW = 12
HANG_GUARD_S = 120   # only stops a hung test; waits end on the event itself, however loaded the machine
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


def _llama(path: Path) -> Path:
    from tests.models.test_hf_conformance import make_hf, save
    # MQA-free GQA: 4 query heads, 2 KV heads (one per rank); vocabulary 128 splits evenly
    return save(make_hf("llama", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                      mlp_bias=True)), path)


def _qwen3(path: Path) -> Path:
    from tests.models.test_hf_conformance import make_hf, save
    # one KV head: replicated on both ranks; a vocabulary of 127 leaves the last rank's slice padded
    return save(make_hf("qwen3", dict(num_key_value_heads=1, vocab_size=127, tie_word_embeddings=True)), path)


def _deepseek_v3(path: Path) -> Path:
    from tests.models.test_deepseek_v3 import make_hf
    hf = make_hf({"first_k_dense_replace": 1, "n_routed_experts": 8, "n_group": 2, "topk_group": 2,
                  "n_shared_experts": 2})
    hf.save_pretrained(path, safe_serialization=True)
    return path


def _qwen3_next(path: Path) -> Path:
    from tests.models.test_delta_models import make_hf
    make_hf("qwen3_next").save_pretrained(path, safe_serialization=True)
    return path


def _deepseek_v32(path: Path) -> Path:
    from tests.models.test_dsa_models import make_hf
    make_hf("deepseek_v32").save_pretrained(path, safe_serialization=True)
    return path


FAMILIES = {"llama": _llama, "qwen3": _qwen3, "deepseek_v3": _deepseek_v3, "qwen3_next": _qwen3_next,
            "deepseek_v32": _deepseek_v32}


def _engine(path: Path, tp: int, **kw) -> LLM:
    return LLM(path, dtype="float32", device="cpu", tensor_parallel_size=tp, kv_cache_memory=4 << 20, page_size=4,
               max_num_seqs=8, **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_match_one_process(family: str, tmp_path: Path) -> None:
    path = FAMILIES[family](tmp_path / family)
    vocab = config_from_hf(__import__("json").loads((path / "config.json").read_text())).vocab_size
    prompts = random_prompts(vocab, (5, 23, 9))
    one = _engine(path, 1, max_num_batched_tokens=16)     # chunked prefill, so decode and prefill share steps
    want = [o.token_ids for o in one.generate(prompts, GREEDY, use_tqdm=False)]
    with _engine(path, 2, max_num_batched_tokens=16) as two:
        # each rank holds half the heads: the cache's per-token bytes halve unless the cache is replicated
        outs = two.generate(prompts + prompts[:1], GREEDY, use_tqdm=False)
        assert [o.token_ids for o in outs] == want + want[:1]
        two.check_integrity()
        procs = two.tp.procs
        # rank 0 holds half of the query heads (and of the KV heads where there are enough to split)
        assert two.model.local_config.num_heads == two.model.config.num_heads // 2
    assert all(not p.is_alive() for p in procs)   # close() reaped the worker


def test_hybrid_prefix_cache_hits_under_tensor_parallelism(tmp_path: Path) -> None:
    """Qwen3-Next (Gated DeltaNet + full attention) at TP 2 with prefix caching: a hit restores the recurrent
    states from a snapshot, which every rank copies within its own state shard (the step's cache instructions).
    Greedy tokens equal TP 1's with the cache on and with it off, and the later requests hit."""
    path = _qwen3_next(tmp_path / "qwen3_next")
    (base,), tails = random_prompts(128, (21,)), random_prompts(128, (5, 9, 3), seed=6)
    first = [base + t for t in tails]

    def run(llm: LLM) -> tuple[list[list[int]], list[int]]:
        """Three prompts sharing 21 tokens, then a follow-up turn of the first conversation."""
        outs = llm.generate(first, GREEDY, use_tqdm=False)
        outs += llm.generate([first[0] + outs[0].token_ids + [7, 8, 9]], GREEDY, use_tqdm=False)
        llm.check_integrity()
        return [o.token_ids for o in outs], [o.cached_tokens for o in outs]

    off, _ = run(_engine(path, 1, enable_prefix_caching=False))
    one, cached_one = run(_engine(path, 1))
    with _engine(path, 2) as two:
        ops, prepare = [], two.runner.prepare
        two.runner.prepare = lambda plan: (r := prepare(plan), ops.extend(r[0].cache_ops))[0]
        tokens, cached = run(two)
    assert tokens == one == off
    assert cached == cached_one and cached[-1] >= 24 and sum(cached[:3]) > 0, cached
    assert {type(op) for op in ops} >= {SaveState, RestoreState, ZeroState, ZeroPages}


def test_killed_worker_fails_the_engine_cleanly(tmp_path: Path) -> None:
    path = _llama(tmp_path / "llama")
    llm = _engine(path, 2)
    worker = llm.tp.procs[0]
    for p in random_prompts(128, (7, 11)):
        llm.add_request(p, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    for _ in range(3):
        llm.step()
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError):
        for _ in range(200):   # the step in flight (or the next) notices, well before the requests could finish
            llm.step()
    assert not llm.has_unfinished()          # pending requests ended
    with pytest.raises(EngineDeadError):
        llm.step()                           # and the engine stays dead
    worker.join(HANG_GUARD_S)
    assert all(not p.is_alive() for p in llm.tp.procs)
    llm.close()


def test_a_dropped_engine_frees_its_workers_and_the_group_for_the_next(tmp_path: Path) -> None:
    """A notebook's `del llm` (no close()) and then a new engine in the same process."""
    path = _llama(tmp_path / "llama")
    prompts = random_prompts(128, (5, 23, 9))
    llm = _engine(path, 2)
    want = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    procs, engine = llm.tp.procs, weakref.ref(llm)
    del llm
    gc.collect()
    assert engine() is None                  # nothing (a finalizer, a helper) keeps the engine alive
    # its finalizer has reaped (or killed) the workers; the wait only guards against a hang
    wait([p.sentinel for p in procs], HANG_GUARD_S)
    assert all(p.exitcode is not None for p in procs)
    assert not dist.is_initialized()
    with _engine(path, 2) as again:
        assert [o.token_ids for o in again.generate(prompts, GREEDY, use_tqdm=False)] == want


def test_a_failed_start_frees_the_group(tmp_path: Path) -> None:
    """An engine whose start fails after its workers started (here: a KV budget below one page) stops them
    itself: the traceback a notebook keeps must not hold the process group the corrected retry needs."""
    path = _llama(tmp_path / "llama")
    with pytest.raises(ValueError) as failed:
        LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2, kv_cache_memory=1)
    assert not dist.is_initialized()
    with _engine(path, 2) as again:          # while `failed` still holds the traceback
        assert again.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].token_ids
    assert "holds no page" in str(failed.value)


def test_sizes_that_do_not_divide_are_refused_with_the_allowed_ones(tmp_path: Path) -> None:
    raw = __import__("json").loads((_llama(tmp_path / "llama") / "config.json").read_text())
    cfg = config_from_hf(raw)      # 4 query heads, 2 KV heads, intermediate 96
    check_tensor_parallel(cfg, 4)  # 4 ranks: one query head each, KV heads replicated
    with pytest.raises(ValueError, match=r"must divide num_attention_heads 4.*allowed sizes for it: 1, 2, 4"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(ValueError, match="integer >= 1"):
        LLM(tmp_path / "llama", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="transformers checkpoint directory"):
        LLM(tmp_path, tensor_parallel_size=2)          # a directory without config.json
    with pytest.raises(ValueError, match="not a loaded model"):
        LLM(load_model(tmp_path / "llama"), tensor_parallel_size=2)
