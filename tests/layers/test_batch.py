"""One path for training and serving: packed varlen batches and the contiguous cache give the
same logits as running each sequence alone in one pass."""

from __future__ import annotations

import torch

from attnzoo.layers import Batch, ContiguousKVCache
from attnzoo.models import DecoderLM, ModelConfig


def tiny(window: int | None = None) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="llama", vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=window)
    model = DecoderLM(cfg).eval()
    for n, p in model.named_parameters():  # norms init to ones: randomise so a norm bug shows
        if "norm" in n:
            p.data.uniform_(0.5, 1.5)
    return model


def test_packed_varlen_equals_separate_runs():
    for window in (None, 5):
        model = tiny(window)
        lens = [7, 1, 19]
        seqs = [torch.randint(0, 97, (n,)) for n in lens]
        cu = torch.tensor([0, 7, 8, 27], dtype=torch.int32)
        pos = torch.cat([torch.arange(n) for n in lens])
        with torch.no_grad():
            packed = model.forward_batch(torch.cat(seqs), Batch(positions=pos, cu_seqlens=cu))
            alone = torch.cat([model(s[None])[0] for s in seqs])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_cached_decode_equals_full_pass():
    for window in (None, 4):
        model = tiny(window)
        ids = torch.randint(0, 97, (2, 20))
        with torch.no_grad():
            full = model(ids)
            cache = ContiguousKVCache(batch_size=2, max_len=20)
            steps = [model(ids[:, :12], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        assert cache.length == 20


def test_logits_rows_selects_rows():
    model = tiny()
    ids = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True)[:, 0], model(ids)[:, -1])


def test_cache_specs_follow_layer_types():
    from attnzoo.layers import FullKV, SlidingKV
    assert tiny().cache_specs() == [FullKV(2, 8)] * 2
    assert tiny(5).cache_specs() == [SlidingKV(2, 8, window=5)] * 2


def test_stack_equal_groups_sequences_by_shape():
    from attnzoo.layers.batch import Span, stack_equal
    spans = [Span(torch.tensor([[0, 1]]), torch.tensor([[0, 1]])), Span(torch.tensor([[2]]), torch.tensor([[2]])),
             Span(torch.tensor([[3, 4]]), torch.tensor([[3, 4]])),
             Span(torch.tensor([[5]]), torch.tensor([[5, 6]]), valid=torch.tensor([[True, False]]))]
    out = stack_equal(spans)
    assert [s.rows.tolist() for s in out] == [[[0, 1], [3, 4]], [[2]], [[5]]]
    assert out[0].keys.tolist() == [[0, 1], [3, 4]] and out[2].valid is not None


def test_sparse_layers_batch_equal_lengths_like_separate_runs():
    """MSA and DSA stack equal-length sequences into one batched selection: still each sequence alone."""
    from attnzoo.arena.mechanisms import Shape, config_for
    for name in ("msa", "dsa"):
        torch.manual_seed(1)
        model = DecoderLM(config_for(name, Shape(vocab_size=61, hidden=32, layers=2, heads=4, head_dim=8,
                                                 intermediate=48, seq_len=64, max_positions=128))).eval()
        for n, p in model.named_parameters():
            if "norm" in n:
                p.data.uniform_(0.5, 1.5)
        lens = [40, 40, 23, 40]
        seqs = [torch.randint(0, 61, (n,)) for n in lens]
        cu = torch.tensor([0, 40, 80, 103, 143], dtype=torch.int32)
        pos = torch.cat([torch.arange(n) for n in lens])
        with torch.no_grad():
            packed = model.forward_batch(torch.cat(seqs), Batch(positions=pos, cu_seqlens=cu))
            alone = torch.cat([model(s[None])[0] for s in seqs])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
