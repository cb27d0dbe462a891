"""GLM-5.3-Flash through the paged engine: KDA states in the state pool, the NoPE latent and the k-pool
indexer rows [k_I | z] in their own page groups on one page table. Each step the pools are rebuilt from the
paged rows of every sequence (decode rows over their whole block tables, chunked prefill over the context
so far), as transformers rebuilds them from its cache. Greedy tokens equal transformers' greedy generate."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.layers import IndexerKeys, LatentKV  # noqa: E402

from tests.hf_oracle import hf_greedy  # noqa: E402
from tests.models.test_glm5_next import VOCAB, make_hf, one_thread  # noqa: E402,F401  (autouse fixture)

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import attnzoo
    path = tmp_path_factory.mktemp("glm5_next")
    hf = make_hf()
    hf.save_pretrained(path, safe_serialization=True)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 30, 13, 1, 40)]
    return attnzoo.load_model(path), prompts, hf_greedy(hf, prompts, NEW)


@pytest.mark.parametrize("chunk", [2048, 7])
def test_engine_matches_transformers(case, chunk) -> None:
    ours, prompts, refs = case
    llm = LLM(ours, kv_cache_memory=4 << 20, page_size=4, max_num_batched_tokens=chunk, max_num_seqs=8)
    assert {g.spec for g in llm.kv.groups} == {LatentKV(16), IndexerKeys(32)}
    assert len(llm.kv.tables) == 1 and llm.kv.states is not None
    assert llm.kv.radix is not None and llm.kv.snapshots is not None  # KDA states restored from snapshots
    outs = llm.generate(prompts + prompts[1:2], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs + refs[1:2]
    llm.check_integrity()
    llm.clear_prefix_cache()
    assert all(g.pool.num_free == llm.kv.num_pages for g in llm.kv.groups)
