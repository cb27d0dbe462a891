"""The arena's data: MQAR answers can be read back from the sequence, the needle sits where it claims,
the corpus split is by file and deterministic, batches depend only on (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo.arena import data
from attnzoo.arena.data import IGNORE, KEY_BASE, VALUE_BASE, VOCAB_SIZE


@pytest.mark.parametrize("T,D", [(16, 4), (64, 4), (130, 8), (256, 16), (512, 32), (1024, 128)])
def test_mqar_answers_recoverable_from_the_sequence(T, D):
    x, y = data.mqar(24, T, D, data.rng(0, 7, T))
    assert x.shape == y.shape == (24, T) and x.dtype == y.dtype == torch.int64
    for xi, yi in zip(x.tolist(), y.tolist()):
        keys, values = xi[0:2 * D:2], xi[1:2 * D:2]
        assert len(set(keys)) == D and all(KEY_BASE <= k < VALUE_BASE for k in keys)
        assert all(VALUE_BASE <= v < VOCAB_SIZE for v in values)
        # every key is asked exactly once after the pairs, and nothing else in the stream is a key
        asked = [t for t in xi[2 * D:] if KEY_BASE <= t < VALUE_BASE]
        assert sorted(asked) == sorted(keys)
        labels = {p: v for p, v in enumerate(yi) if v != IGNORE}
        assert labels == data.parse_mqar(xi, D) and len(labels) == D
        for p, v in labels.items():  # the answer is the value bound to the queried key, written right after it
            assert v == values[keys.index(xi[p])] and xi[p + 1] == v and p >= 2 * D
        assert all(0 <= t < VOCAB_SIZE for t in xi) and min(xi) >= KEY_BASE  # disjoint from bytes / specials


def test_mqar_is_a_function_of_its_generator_and_checks_its_arguments():
    a, b = data.mqar(4, 64, 4, data.rng(1, 2)), data.mqar(4, 64, 4, data.rng(1, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], data.mqar(4, 64, 4, data.rng(1, 3))[0])
    for T, D in ((63, 4), (64, 17), (64, 0)):
        with pytest.raises(ValueError, match="MQAR"):
            data.mqar(1, T, D, data.rng(0))
    sets = data.mqar_eval_sets((64, 128), 8, seed=0)
    assert {T: (x.shape, data.kv_pairs(T)) for T, (x, _) in sets.items()} == {64: ((8, 64), 4), 128: ((8, 128), 8)}


def test_mqar_with_replacement_asks_random_keys():
    x, y = data.mqar(200, 16, 2, data.rng(0, 1), vocab=8, noise="pad", with_replacement=True)
    repeats = 0
    for xi, yi in zip(x.tolist(), y.tolist()):
        labels = {p: v for p, v in enumerate(yi) if v != IGNORE}
        assert labels == data.parse_mqar(xi, 2) and len(labels) == 2
        asked = [xi[p] for p in labels]
        repeats += asked[0] == asked[1]
        assert set(xi[4:]) <= {data.PAD, *xi[0:4]}                 # pad filler; only the pairs' tokens
    assert 70 < repeats < 130                                        # half the sequences ask one key twice


def test_needle_probe_builds_what_it_claims():
    hay = np.arange(1000, dtype=np.uint16) % 256
    key, value = KEY_BASE + 5, VALUE_BASE + 9
    for depth in (0.0, 0.25, 0.5, 1.0):
        x = data.needle_probe(hay, 300, depth, key, value).tolist()
        assert len(x) == 300 and x[-1] == key
        at = x.index(key)
        assert x[at + 1] == value and abs(at - depth * 297) <= 1
        text = x[:at] + x[at + 2:-1]
        assert text == hay[:297].tolist()       # the haystack is untouched around the needle
    sets = data.needle_sets(hay, (64, 128), (0.1, 0.9), 3, seed=0)
    assert [(s.context, tuple(s.inputs.shape), len(s.answers)) for s in sets] == [(64, (6, 64), 6), (128, (6, 128), 6)]
    for s in sets:
        for x, ans in zip(s.inputs.tolist(), s.answers.tolist()):
            assert x[x.index(x[-1]) + 1] == ans and VALUE_BASE <= ans < VOCAB_SIZE
            assert sum(KEY_BASE <= t < VALUE_BASE for t in x) == 2   # the needle's key and the question
    with pytest.raises(ValueError):
        data.needle_probe(hay, 2000, 0.5, key, value)


def test_corpus_split_by_file_sorted_and_deterministic(tmp_path):
    for i in range(60):
        (tmp_path / f"m{i:02d}.py").write_text(f"x{i} = {i}\n" * 20)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "big.py").write_text("NOT STDLIB\n")
    (tmp_path / "notes.txt").write_text("not python")
    c = data.load_corpus(tmp_path, val_percent=20)
    assert c.files == 60 and 0 < c.val_files < 60
    val_names = {f"m{i:02d}.py" for i in range(60) if data.is_validation(f"m{i:02d}.py", 20)}
    assert len(val_names) == c.val_files
    val_text = bytes(c.val[c.val < 256].astype(np.uint8)).decode()
    for i in range(60):   # each file lands whole in exactly one split
        line = f"x{i} = {i}\n"
        assert (line in val_text) == (f"m{i:02d}.py" in val_names)
    train_text = bytes(c.train[c.train < 256].astype(np.uint8)).decode()
    assert "NOT STDLIB" not in train_text + val_text and "not python" not in train_text
    at = [train_text.index(f"x{i} = {i}\n") for i in range(60) if f"m{i:02d}.py" not in val_names]
    assert at == sorted(at)   # files in sorted path order
    assert data.load_corpus(tmp_path, val_percent=20).fingerprint == c.fingerprint
    assert (c.train == data.EOT).sum() + (c.val == data.EOT).sum() == 60


def test_lm_batches_depend_only_on_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16) % 256
    a = data.lm_batch(tokens, 4, 32, seed=3, step=7)
    assert a.shape == (4, 33) and torch.equal(a, data.lm_batch(tokens, 4, 32, seed=3, step=7))
    assert not torch.equal(a, data.lm_batch(tokens, 4, 32, seed=3, step=8))
    assert not torch.equal(a, data.lm_batch(tokens, 4, 32, seed=4, step=7))
    w = data.val_windows(tokens, 32, 10)
    assert w.shape == (10, 33) and torch.equal(w, data.val_windows(tokens, 32, 10))
