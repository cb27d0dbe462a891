"""MTP speculative decoding (engine/mtp_drafter.py) on a tiny DeepSeek-V3 with random MTP weights (models/mtp.py's
test checkpoints): greedy tokens with MTP drafts equal the tokens without, batched, in 8-token chunks with the
prefix cache on; every proposal is the MTP module's own greedy chain, computed over the full sequence from the
target's post-norm hidden states (`MTPLayer.forward`); a step runs one target forward whose LM head sees only the
verify rows, and k module forwards; both caches keep their integrity, and the drafter's pages and kept hidden
rows all come back.

Random weights make acceptance meaningless, so the LM head (the target's and the module's) keeps LIVE rows: the
module's guesses then match the target's often enough for drafts kept, partly kept and rejected."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import attnzoo  # noqa: E402
from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.engine.mtp_drafter import MTPDrafter  # noqa: E402
from attnzoo.models import DecoderLM  # noqa: E402

from tests.engine.test_speculative import prompts  # noqa: E402
from tests.models.test_deepseek_v3 import VOCAB, make_hf  # noqa: E402
from tests.models.test_mtp import mtp_tensors, save  # noqa: E402

PS, MAX_LEN, NEW, K, CHUNK = 4, 128, 20, 2, 8
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
SPEC = {"method": "mtp", "num_speculative_tokens": K, "adaptive": False}
LIVE = 5   # LM-head rows left; the others give logit 0, so ties at 0 go to token LIVE


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> DecoderLM:
    hf = make_hf({"num_nextn_predict_layers": 1})
    path = tmp_path_factory.mktemp("deepseek_v3_mtp")
    save(hf, path, mtp_tensors(hf, own_head=False))
    m = attnzoo.load_model(path)
    assert len(m.mtp) == 1 and m.mtp[0].lm_head is None   # the module reads the target's head
    with torch.no_grad():
        m.lm_head.weight[LIVE:] = 0
    return m


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    llm = LLM(model, page_size=PS, max_model_len=MAX_LEN)
    return [o.token_ids for o in llm.generate(prompts(VOCAB), GREEDY, use_tqdm=False)]


def engine(model: DecoderLM) -> LLM:
    return LLM(model, page_size=PS, max_model_len=MAX_LEN, max_num_seqs=8, max_num_batched_tokens=CHUNK,
               speculative_config=SPEC)


def run(llm: LLM, each_step=lambda: None) -> list[list[int]]:
    ids = [llm.add_request(p, GREEDY) for p in prompts(VOCAB)]
    outs = {}
    while llm.has_unfinished():
        for o in llm.step():
            outs[o.request_id] = o.token_ids
        llm.check_integrity()
        each_step()
    return [outs[i] for i in ids]


def check_mtp_chain(model: DecoderLM, ids: list[int], drafts: list[int], tol: float = 1e-4) -> None:
    """Each draft is the module's argmax (within tol: near ties) after the ones before it. Position i pairs the
    target's h_i (after its final norm) with ids[i + 1]; a chained position pairs the previous draft with the
    block's output at the previous position."""
    with torch.no_grad():
        _, h = model(torch.tensor([ids[:-1]]), return_hidden=True)
        h, nxt = model.norm(h), torch.tensor([ids[1:]])
        for d in drafts:
            logits, out = model.mtp[0](h, nxt, return_hidden=True)
            last = logits[0, -1]
            assert last[d] >= last.max() - tol, (d, last.argmax().item(), (last.max() - last[d]).item())
            h, nxt = torch.cat([h, out[:, -1:]], 1), torch.cat([nxt, torch.tensor([[d]])], 1)


def test_mtp_drafts_keep_greedy_tokens_and_are_the_modules_own(model, reference) -> None:
    llm = engine(model)
    drafter = llm.drafter
    assert isinstance(drafter, MTPDrafter) and llm.runner.want_hidden
    propose, proposed = drafter.propose, []

    def check(reqs: list) -> None:
        propose(reqs)
        for r in reqs:
            if r.spec_ids:
                check_mtp_chain(model, r.all_ids(), r.spec_ids)
                proposed.append(len(r.spec_ids))

    def bounded() -> None:   # the kept rows: about one step's, never a whole prompt or output
        assert all(len(rows) <= CHUNK + K + 2 for _, _, rows in drafter.rows.values())

    drafter.propose = check
    assert run(llm, bounded) == reference
    s = llm.spec_stats
    assert sum(proposed) >= s.drafted and 0 < s.accepted < s.drafted, (s.accepted, s.drafted)
    assert drafter.shadows and drafter.rows   # finished requests' shadows and rows go at the next step
    llm.step()
    assert not drafter.shadows and not drafter.rows
    assert all(t.pool.num_free == t.pool.capacity for t in drafter.kv.tables)


def test_a_step_costs_one_target_forward_and_k_module_forwards(model, reference) -> None:
    """The target's LM head runs once per step, on the sampling and verify rows only, while the drafter gets the
    hidden states of every row; the module runs at most k forwards per step (one catch-up, k - 1 chained)."""
    llm = engine(model)
    head_rows, module_runs = [], []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[0]))
    execute, draft_run, propose = llm.runner.execute, llm.drafter.runner.run, llm.drafter.propose

    def target_step(inputs):
        head_rows.clear()
        logits = execute(inputs)
        assert head_rows == [len(inputs.logits_rows)] and llm.runner.hidden.shape[0] == len(inputs.ids)
        return logits

    def counted_propose(reqs: list) -> None:
        module_runs.append(0)
        propose(reqs)

    def module_step(plan):
        module_runs[-1] += 1
        return draft_run(plan)

    llm.runner.execute, llm.drafter.runner.run, llm.drafter.propose = target_step, module_step, counted_propose
    try:
        assert run(llm) == reference
    finally:
        hook.remove()
    assert max(module_runs) == K and llm.spec_stats.drafted > 0


def test_a_model_without_mtp_layers_is_one_error(model) -> None:
    plain = copy.deepcopy(model)
    plain.mtp = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="this model has no multi-token-prediction layers"):
        LLM(plain, page_size=PS, max_model_len=MAX_LEN, speculative_config=SPEC)
