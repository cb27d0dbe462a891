"""Structured outputs (engine/structured.py): the params' validation, the sampler's mask, the verify rows' masks
against a fresh matcher fed the same drafts, and the default model's constrained outputs checked by parsers we
did not write (json + jsonschema, re.fullmatch)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.engine.sampling import Sampler, SamplingRow  # noqa: E402
from attnzoo.engine.structured import GrammarState, StructuredOutputsParams as SO  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role", "address", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 18, "maximum": 99},
                         "role": {"enum": ["admin", "editor", "viewer"]},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}}}


@pytest.mark.parametrize("kw, msg", [
    ({}, "exactly one of json, regex, choice, grammar, json_object; got none"),
    ({"json": {}, "regex": "a"}, "got json, regex"),
    ({"json": 3}, "JSON schema object"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", 1]}, "non-empty list"),
    ({"regex": ""}, "non-empty string"),
    ({"grammar": "x" * 70000}, "at most"),
])
def test_params_say_what_is_wrong(kw, msg) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        SO(**kw)


def test_params_from_a_dict_and_hashable() -> None:
    p = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert p.structured_outputs == SO(choice=("a", "b")) and hash(p.structured_outputs)


def test_sampler_never_draws_a_masked_token() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    allowed = torch.rand(6, 50, generator=g) < 0.2
    allowed[:, 7] = True
    rows = [SamplingRow(SamplingParams(temperature=t, seed=i), torch.Generator().manual_seed(i), [1], [])
            for i, t in enumerate([0, 0, 0.7, 1.0, 1.5, 0.7])]
    for _ in range(20):
        toks = Sampler()(logits, rows, [], allowed).token_ids
        assert all(allowed[i, t] for i, t in enumerate(toks))
    greedy = Sampler()(logits, rows, [], allowed).token_ids[:2]
    assert greedy == logits.masked_fill(~allowed, -1e9).argmax(-1)[:2].tolist()


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2", dtype="float32", max_num_seqs=8, kv_cache_memory=64 << 20, enforce_eager=True)


def _prompt(llm, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_verify_masks_follow_the_drafts(llm) -> None:
    """Rows of a drafted request get the masks of a fresh matcher fed the drafts one by one; a forbidden draft
    ends its rows; the request's matcher is where it was before."""
    comp = llm.structured
    grammar = comp.compile(SO(json=PERSON))
    text = '{"name":"Ann","age":30,"role":"viewer","address":{"city":"Rome","zip":"00100"},"tags":[]}'
    ids = llm.tokenizer.encode(text)
    state = GrammarState(comp.matcher(grammar))
    for t in ids[:5]:
        state.accept(t, llm.tokenizer)
    drafts = [ids[5:9], ids[5:7] + [llm.tokenizer.encode("zzz")[0]] + ids[8:10]]
    masks = comp.allowed([state, None, state], [drafts[0], [3], drafts[1]])
    assert masks.shape == (len(drafts[0]) + 1 + 2 + len(drafts[1]) + 1, llm.model.config.vocab_size)
    assert masks[len(drafts[0]) + 1:len(drafts[0]) + 3].all()          # the free request: everything allowed

    def oracle(prefix: list[int]) -> torch.Tensor:
        m = comp.matcher(grammar)
        assert m.consume_tokens(ids[:5] + prefix)
        bm = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)   # llguidance's own mask
        return ((bm[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()[:masks.shape[1]]

    for j in range(len(drafts[0]) + 1):
        assert torch.equal(masks[j], oracle(drafts[0][:j]))
    base = len(drafts[0]) + 3
    for j in range(3):   # rows up to and including the forbidden draft's own row
        assert torch.equal(masks[base + j], oracle(drafts[1][:j]))
    assert not masks[base + 2, drafts[1][2]]
    assert torch.equal(comp.allowed([state])[0], oracle([]))              # rolled back


def test_reasoning_first_then_the_grammar(llm) -> None:
    comp, tok = llm.structured, llm.tokenizer
    state = GrammarState(comp.matcher(comp.compile(SO(choice=["yes", "no"]))), after="</think>")
    assert comp.allowed([state]) is None
    for t in tok.encode("hmm, let me think</think>"):
        state.accept(t, tok)
    assert state.active
    allowed = comp.allowed([state])[0]
    assert allowed[tok.encode("yes")[0]] and not allowed[tok.encode("maybe")[0]]


def test_json_schema_outputs_validate(llm) -> None:
    prompt = _prompt(llm, "Give me a user record as JSON.")
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured_outputs=SO(json=PERSON))
              for s in range(3)]
    outs = llm.generate([prompt] * 3, params, use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text   # EOS only once the object is complete
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)
    llm.check_integrity()


@pytest.mark.parametrize("so, check", [
    (SO(regex=r"[A-Z][a-z]{2,8}-[0-9]{2,4}"), lambda s: re.fullmatch(r"[A-Z][a-z]{2,8}-[0-9]{2,4}", s)),
    (SO(choice=["red", "green", 'bl"ue\n']), lambda s: s in ("red", "green", 'bl"ue\n')),
    (SO(json_object=True), lambda s: isinstance(json.loads(s), dict)),
    (SO(grammar='root ::= "The answer is " [0-9]+ "."'), lambda s: re.fullmatch(r"The answer is [0-9]+\.", s)),
    (SO(grammar='start: "x" NUM "y"\nNUM: /[0-9]{3}/'), lambda s: re.fullmatch(r"x[0-9]{3}y", s)),
])
def test_each_constraint(llm, so, check) -> None:
    prompt = _prompt(llm, "Answer briefly.")
    for seed in range(2):
        o = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0.9, seed=seed, structured_outputs=so),
                         use_tqdm=False)[0].outputs[0]
        assert o.finish_reason == "stop" and check(o.text), o.text


def test_length_inside_an_object(llm) -> None:
    o = llm.generate(_prompt(llm, "JSON please"), SamplingParams(max_tokens=5, temperature=0,
                                                                 structured_outputs=SO(json=PERSON)),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5 and o.text.startswith("{")


@pytest.mark.parametrize("bad, msg", [({"json": {"type": "nope"}}, "does not compile"),
                                      ({"regex": "("}, "unclosed group"),
                                      ({"grammar": "root ::= undefined_rule"}, "does not compile")])
def test_bad_grammar_is_a_value_error_and_nothing_queues(llm, bad, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        llm.generate(["hi", "ho"], [SamplingParams(), SamplingParams(structured_outputs=SO(**bad))], use_tqdm=False)
    assert not llm.has_unfinished()


def test_free_requests_unchanged_by_constrained_neighbours(llm) -> None:
    """fp32: the free requests' greedy tokens are the same with constrained requests in the batch."""
    rnd = random.Random(0)
    free = [_prompt(llm, f"Tell me about {w}.") for w in ("rivers", "owls", "tea")]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(free, greedy, use_tqdm=False)]
    mixed = [SO(json=PERSON), SO(choice=["a", "b"]), SO(regex="[0-9]+")]
    prompts = free + [_prompt(llm, "JSON") for _ in mixed]
    params = [greedy] * 3 + [SamplingParams(max_tokens=16, temperature=0.8, seed=rnd.randrange(99),
                                            structured_outputs=so) for so in mixed]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:3]] == alone


def test_n_completions_and_abort_while_compiling(llm) -> None:
    so = SO(json={"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"],
                  "additionalProperties": False})
    o = llm.generate(_prompt(llm, "JSON"), SamplingParams(n=3, max_tokens=20, temperature=1.0, seed=1,
                                                         structured_outputs=so), use_tqdm=False)[0]
    assert len(o.outputs) == 3 and all(isinstance(json.loads(c.text)["k"], int) for c in o.outputs)
    rid = llm.add_request("hi", SamplingParams(structured_outputs=SO(regex="[a-z]{1,5}")))
    llm.abort(rid)
    while llm.has_unfinished():
        llm.step()
    llm.check_integrity()


def test_speculative_drafts_are_masked_too() -> None:
    """With n-gram drafts the constrained greedy output is the one without drafting, and valid."""
    so = SO(json={"type": "object", "additionalProperties": False, "required": ["items"],
                  "properties": {"items": {"type": "array", "minItems": 6, "maxItems": 6,
                                           "items": {"enum": ["apple", "pear"]}}}})
    outs = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": False}):
        llm = LLM("smollm2", dtype="float32", max_num_seqs=2, kv_cache_memory=32 << 20, enforce_eager=True,
                  speculative_config=spec)
        p = _prompt(llm, 'List fruit as JSON: {"items":["apple","pear","apple","pear","apple","pear"]}')
        o = llm.generate(p, SamplingParams(max_tokens=60, temperature=0, structured_outputs=so), use_tqdm=False)[0]
        outs.append(o.outputs[0].token_ids)
        assert json.loads(o.outputs[0].text)["items"]
        llm.check_integrity()
    assert outs[0] == outs[1] and llm.spec_stats.drafted > 0
