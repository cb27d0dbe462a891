"""Draft-model speculative decoding: greedy tokens with a draft model equal the tokens without one, batched, in
8-token chunks with the prefix cache on; the target's and the draft's caches keep their integrity every step
and the draft's pages all come back. A draft that is the target itself has nearly every draft kept, an
unrelated one nearly none; a draft the target cannot use is one ValueError at construction."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from attnzoo.arena import mechanisms  # noqa: E402
from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.models import DecoderLM  # noqa: E402

from tests.engine.test_hybrid_prefix_cache import _peaked  # noqa: E402
from tests.engine.test_speculative import _peaked_llama, prompts  # noqa: E402
from tests.hf_oracle import save_and_load  # noqa: E402
from tests.models.test_hf_conformance import CASES, make_hf  # noqa: E402

PS, MAX_LEN, NEW = 4, 128, 20
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
NOISE = 0.02


def spec(draft: object, k: int = 3, adaptive: bool = False) -> dict:
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": k, "adaptive": adaptive}


def arena(name: str, vocab: int) -> DecoderLM:
    shape = mechanisms.Shape(vocab_size=vocab, hidden=32, layers=2, heads=4, head_dim=8, intermediate=64,
                             seq_len=64, max_positions=256)   # window 16
    return _peaked(DecoderLM(mechanisms.config_for(name, shape)))


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> DecoderLM:
    return _peaked_llama(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def reference(target) -> list[list[int]]:
    llm = LLM(target, page_size=PS, max_model_len=MAX_LEN)
    return [o.token_ids for o in llm.generate(prompts(target.config.vocab_size), GREEDY, use_tqdm=False)]


def run(target: DecoderLM, draft: object) -> tuple[list[list[int]], LLM]:
    """Greedy outputs with `draft` drafting, 8 tokens per step, prefix cache on; both caches checked each step."""
    llm = LLM(target, page_size=PS, max_model_len=MAX_LEN, max_num_seqs=8, max_num_batched_tokens=8,
              speculative_config=spec(draft))
    ids = [llm.add_request(p, GREEDY) for p in prompts(target.config.vocab_size)]
    outs = {}
    while llm.has_unfinished():
        for o in llm.step():
            outs[o.request_id] = o.token_ids
        llm.check_integrity()
        llm.drafter.check_integrity()
    assert llm.drafter.shadows              # finished requests' shadows go at the next step
    llm.step()
    kv = llm.drafter.kv
    assert not llm.drafter.shadows and all(t.pool.num_free == t.pool.capacity for t in kv.tables)
    return [outs[i] for i in ids], llm


def test_the_target_as_its_own_draft_keeps_nearly_every_draft(target, reference) -> None:
    tokens, llm = run(target, target)
    assert tokens == reference
    s = llm.spec_stats
    assert s.drafted > 0 and s.accepted >= 0.9 * s.drafted, (s.accepted, s.drafted)


@pytest.mark.parametrize("kind", ["llama-1-layer", "arena:swa"])
def test_an_unrelated_draft_keeps_greedy_tokens(target, reference, kind, tmp_path) -> None:
    """A loaded-by-path llama of another seed and depth, and a sliding-window model (window 16, shorter than
    the sequences: its window pages are released as shadows grow and roll back)."""
    if kind == "arena:swa":
        draft = arena("swa", target.config.vocab_size)
    else:
        family, overrides, _ = CASES["llama-gqa"]
        save_and_load(make_hf(family, {**overrides, "num_hidden_layers": 1}, seed=1), tmp_path)
        draft = str(tmp_path)
    tokens, llm = run(target, draft)
    assert tokens == reference
    s = llm.spec_stats
    assert 0 < s.drafted and s.accepted < 0.5 * s.drafted, (s.accepted, s.drafted)


def test_drafts_are_the_draft_models_greedy_continuation(target, reference) -> None:
    """A near copy of the target (its weights perturbed): some drafts kept, some rejected mid-proposal, and
    adaptive k pauses drafting (from k = 3 of 6) while the target goes on, so shadows roll back over several
    of the target's steps at once. Every proposal must be the draft model's own greedy continuation of the
    request's tokens (a full forward over tokens + drafts, teacher-forced), whatever was drafted and rejected
    before."""
    draft = copy.deepcopy(target)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * NOISE)
    llm = LLM(target, page_size=PS, max_model_len=MAX_LEN, max_num_batched_tokens=8,
              speculative_config=spec(draft, 6, adaptive=True))
    propose, checked = llm.drafter.propose, []

    def check(reqs: list) -> None:
        propose(reqs)
        for r in reqs:
            if r.spec_ids:
                with torch.no_grad():
                    logits = draft(torch.tensor([r.all_ids() + r.spec_ids]))[0, r.num_tokens - 1:]
                assert logits.argmax(-1)[:len(r.spec_ids)].tolist() == r.spec_ids
                checked.append(len(r.spec_ids))

    llm.drafter.propose = check
    tokens = [o.token_ids for o in llm.generate(prompts(target.config.vocab_size), GREEDY, use_tqdm=False)]
    assert tokens == reference
    s = llm.spec_stats
    assert sum(checked) >= s.drafted and 0 < s.accepted < s.drafted, (s.accepted, s.drafted)


def _tokenizer(swap: bool):
    from tokenizers import Tokenizer as HFTokenizer, models

    from attnzoo.models.tokenizer import Tokenizer
    vocab = {f"t{i}": i for i in range(128)}
    if swap:
        vocab["t5"], vocab["t6"] = 6, 5
    return Tokenizer(HFTokenizer(models.WordLevel(vocab, unk_token="t0")), bos_token_id=None, eos_token_ids=[])


@pytest.mark.parametrize("case, match", [
    ("vocab", "the draft model's vocabulary has 96 tokens, the target's 128"),
    ("tokenizer", "tokenizer differs from the target's"),
    ("recurrent", r"attention-only for now: the draft model's layers \[0, 1\] keep a recurrent state"),
])
def test_an_unusable_draft_is_one_error_at_construction(target, case, match) -> None:
    if case == "vocab":
        draft = arena("swa", 96)
    elif case == "recurrent":
        draft = arena("gdn", target.config.vocab_size)
    else:
        target, draft = copy.deepcopy(target), copy.deepcopy(target)
        target.tokenizer, draft.tokenizer = _tokenizer(False), _tokenizer(True)
        LLM(target, page_size=PS, max_model_len=MAX_LEN, speculative_config=spec(copy.deepcopy(target)))  # same: fine
    with pytest.raises(ValueError, match=match):
        LLM(target, page_size=PS, max_model_len=MAX_LEN, speculative_config=spec(draft))


def test_prompt_longer_than_a_step_catches_up_in_chunks(target) -> None:
    """A prompt three times max_num_batched_tokens: the shadow catches up over several steps, then drafts."""
    llm = LLM(target, page_size=PS, max_model_len=MAX_LEN, max_num_batched_tokens=8,
              speculative_config=spec(target))
    prompt = torch.randint(3, target.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    want = LLM(target, page_size=PS, max_model_len=MAX_LEN).generate([prompt], GREEDY, use_tqdm=False)
    got = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert got[0].token_ids == want[0].token_ids and llm.spec_stats.accepted > 0
