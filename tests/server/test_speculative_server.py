"""Speculative decoding through the command line and the server: `--speculative-config` is checked by argparse
(a bad config exits 2 naming the flag, before any model loads) and reaches the `LLM` of serve, chat and generate;
a served greedy answer with n-gram drafting equals the offline engine's without it, the API process's
`RequestOutput` carries the request's draft counts, and /metrics and the stats line count them."""

from __future__ import annotations

import logging
import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from attnzoo import cli
from attnzoo.engine import LLM, SamplingParams
from attnzoo.engine.speculative import SpeculativeConfig
from attnzoo.server.core_messages import EngineConfig, EngineStats
from attnzoo.server.engine_client import EngineClient
from attnzoo.server.metrics import LOG_INTERVAL_S, ServerMetrics
from tests.server.conftest import HANG_S, KV_BYTES, serving
from tests.server.test_engine_core import complete, served_outputs

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}
# greedy SmolLM2 goes on with the week, so the n-gram drafter finds what follows in the prompt
PROMPT = "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,"
SPEC_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")


class Loaded(Exception):
    """What the patched loaders raise: reaching one means the arguments were accepted."""


@pytest.fixture
def no_loading(monkeypatch) -> list:
    """serve, chat and generate stop where they would load a model; the list gets what they would build with."""
    built: list = []

    def client(config: EngineConfig):
        built.append(config.llm_kwargs["speculative_config"])
        raise ValueError("not loading in this test")

    def load_model(*a, **kw):
        raise Loaded

    monkeypatch.setattr("attnzoo.server.engine_client.EngineClient", client)
    monkeypatch.setattr("attnzoo.models.registry.load_model", load_model)
    # and leave this process as it is: no socket, torch threads, environment or log handler of serve's or chat's
    for name in ("attnzoo.server.main.listen_socket", "attnzoo.server.main.api_process_threads",
                 "attnzoo.server.main.bound_kernel_caches", "attnzoo.cli._show_engine_log"):
        monkeypatch.setattr(name, lambda *a: None)
    return built


@pytest.mark.parametrize("command", [["serve"], ["chat"], ["generate", "hi"]])
@pytest.mark.parametrize("spec, fragment", [
    ('{method: "ngram"}', "speculative_config is not valid JSON"),
    ('{"method": "eagle", "num_speculative_tokens": 3}', "method must be one of ['ngram', 'draft_model', 'mtp'], "
                                                         "got 'eagle'"),
    ('{"method": "ngram"}', "num_speculative_tokens is required"),
    ('{"method": "ngram", "num_speculative_tokens": 99}', "num_speculative_tokens must be an integer in [1, 16]"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "k": 1}', "unknown key(s) ['k']"),
    ('[1]', "must be a JSON object"),
])
def test_a_bad_config_is_an_argument_error_before_loading(command, spec, fragment, no_loading, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--speculative-config", spec])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("attnzoo: error: argument --speculative-config: ") and fragment in line, line
    assert not no_loading


def test_serve_hands_the_parsed_config_to_the_engine(no_loading, capsys):
    k = random.randint(1, 16)
    spec = f'{{"method": "ngram", "num_speculative_tokens": {k}, "prompt_lookup_max": 3}}'
    assert cli.main(["serve", "--speculative-config", spec]) == 2
    assert "not loading in this test" in capsys.readouterr().err
    assert no_loading == [SpeculativeConfig("ngram", k, prompt_lookup_max=3, prompt_lookup_min=2)]
    assert cli.main(["serve"]) == 2      # off by default
    assert no_loading[1] is None


@pytest.mark.parametrize("command", [["chat"], ["generate", "hi"]])
def test_chat_and_generate_hand_it_to_their_engine(command, no_loading, monkeypatch):
    seen: list = []

    class Model:
        tokenizer = object()

    def llm(model, **kw):
        seen.append(kw["speculative_config"])
        raise Loaded
    monkeypatch.setattr("attnzoo.models.registry.load_model", lambda *a, **kw: Model())
    monkeypatch.setattr("attnzoo.engine.LLM", llm)
    with pytest.raises(Loaded):
        cli.main([*command, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5}'])
    assert seen == [SpeculativeConfig("ngram", 5, prompt_lookup_max=4, prompt_lookup_min=2)]


def test_metrics_follow_the_cores_counts(caplog):
    """Counters from the cumulative counts, the histogram from each step's acceptance lengths; the log line's
    acceptance figures over its window. Random verifies (k drafted, a kept) spread over a few steps."""
    m, rng = ServerMetrics("m", speculative=True), random.Random()
    verifies = [(k, rng.randint(0, k)) for k in (rng.randint(1, 16) for _ in range(rng.randint(5, 40)))]
    cuts = sorted(rng.sample(range(1, len(verifies)), 3)) + [len(verifies)]
    done = 0
    for cut in cuts:
        m.on_step(EngineStats(1, 0, 0.5, 0, sum(k for k, _ in verifies[:cut]), sum(a for _, a in verifies[:cut]),
                              [a + 1 for _, a in verifies[done:cut]]))
        done = cut
    drafted, accepted = sum(k for k, _ in verifies), sum(a for _, a in verifies)

    def value(name: str, **lab: str) -> float | None:
        return m.registry.get_sample_value(f"attnzoo:{name}", {"model_name": "m", **lab})
    assert value("spec_decode_num_drafts_total") == len(verifies)
    assert value("spec_decode_num_draft_tokens_total") == drafted
    assert value("spec_decode_num_accepted_tokens_total") == accepted
    assert value("spec_decode_acceptance_length_count") == len(verifies)
    assert value("spec_decode_acceptance_length_sum") == accepted + len(verifies)
    for le in (1, 2, 9, 17):
        assert value("spec_decode_acceptance_length_bucket", le=f"{le:.1f}") == sum(a + 1 <= le for _, a in verifies)
    m._last_log -= LOG_INTERVAL_S
    with caplog.at_level(logging.INFO, logger="attnzoo.server"):
        m.maybe_log(EngineStats(1, 0, 0.5, 0, drafted, accepted), busy=True)
    assert (f"Draft acceptance rate: {100 * accepted / drafted:.1f}%, "
            f"Mean acceptance length: {1 + accepted / len(verifies):.2f}") in caplog.text
    # without drafting: neither the metrics nor the figures
    off = ServerMetrics("m")
    off.on_step(EngineStats(1, 0, 0.5, 0))
    off._last_log -= LOG_INTERVAL_S
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="attnzoo.server"):
        off.maybe_log(EngineStats(1, 0, 0.5, 0), busy=True)
    assert "KV cache usage" in caplog.text and "acceptance" not in caplog.text
    assert not any(f.name.startswith("attnzoo:spec_decode") for f in off.registry.collect())


@pytest.fixture(scope="module")
def live():
    # fp32 like the offline `model` fixture
    core = EngineClient(EngineConfig("smollm2", dict(kv_cache_memory=KV_BYTES, max_num_seqs=4, dtype="float32",
                                                     speculative_config=NGRAM)))
    with serving(core) as s:
        yield s


def spec_metrics(live) -> dict[str, float]:
    text = httpx.get(live.url + "/metrics", timeout=HANG_S).text
    return {s.name.removeprefix("attnzoo:"): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if "spec_decode" in s.name and "bucket" not in s.name and "created" not in s.name}


def test_served_drafts_keep_the_greedy_answer_and_are_counted(live, model, monkeypatch):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    offline = LLM(model, kv_cache_memory=KV_BYTES, max_num_seqs=4).generate(PROMPT, params, use_tqdm=False)[0]
    before = spec_metrics(live)
    assembled = served_outputs(monkeypatch)
    served = complete(live, prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True)["choices"][0]
    assert served["text"] == offline.text
    (out,) = assembled.values()
    assert out.token_ids == offline.token_ids
    assert 0 < out.num_accepted_tokens <= out.num_draft_tokens     # the week repeats: drafts are kept
    after = spec_metrics(live)
    grew = {name: after[name] - before.get(name, 0.0) for name in after}
    assert grew["spec_decode_num_draft_tokens_total"] == out.num_draft_tokens
    assert grew["spec_decode_num_accepted_tokens_total"] == out.num_accepted_tokens
    verifies = grew["spec_decode_num_drafts_total"]
    assert 0 < verifies <= out.num_draft_tokens and grew["spec_decode_acceptance_length_count"] == verifies
    assert grew["spec_decode_acceptance_length_sum"] == out.num_accepted_tokens + verifies
