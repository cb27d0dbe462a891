"""Sharded loading: each rank reads only its slices of the checkpoint, and the slices put together are the
full model's tensors (no collective runs while loading, so both ranks load here in one process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import attnzoo  # noqa: E402
from attnzoo.distributed import ParallelContext  # noqa: E402
from attnzoo.layers.parallel import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding  # noqa: E402
from attnzoo.models import sharding  # noqa: E402

from tests.models.test_hf_conformance import make_hf, save  # noqa: E402


def test_shards_put_together_are_the_full_model(tmp_path: Path, monkeypatch) -> None:
    path = save(make_hf("llama", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=127)), tmp_path)
    full = attnzoo.load_model(path)
    read_whole: list[str] = []
    real = sharding.read_slice

    def spy(st, key, name, cfg, ctx):
        if sharding.shard_ranges(name, tuple(st.get_slice(key).get_shape()), cfg, ctx) is None:
            read_whole.append(name)
        return real(st, key, name, cfg, ctx)
    monkeypatch.setattr(sharding, "read_slice", spy)
    shards = [sharding.load_hf_shard(path, ParallelContext(r, 2)) for r in range(2)]
    # only the replicated tensors (norms) are read whole
    assert read_whole and all("norm" in n for n in read_whole)
    a0, a1 = (s.layers[0].attn for s in shards)
    assert a0.num_heads == 2 and a0.num_kv_heads == 1 and shards[0].config.num_heads == 4
    assert isinstance(a0.o_proj, RowParallelLinear) and isinstance(shards[1].embed_tokens, VocabParallelEmbedding)
    assert isinstance(shards[0].lm_head, ParallelLMHead) and shards[1].embed_tokens.vocab_start == 64
    # o_proj: input columns split; the vocabulary: rows split, the last rank padded with a zero row
    torch.testing.assert_close(torch.cat([a0.o_proj.weight, a1.o_proj.weight], 1), full.layers[0].attn.o_proj.weight)
    emb = torch.cat([s.embed_tokens.weight for s in shards])
    torch.testing.assert_close(emb[:127], full.embed_tokens.weight)
    assert emb.shape[0] == 128 and emb[127].abs().sum() == 0
    # fused qkv: each rank's [q heads | its KV head]
    q, k, v = full.layers[0].attn.qkv_proj.weight.split([64, 32, 32])
    torch.testing.assert_close(a1.qkv_proj.weight, torch.cat([q[32:], k[16:], v[16:]]))
    down = torch.cat([s.layers[1].mlp.down_proj.weight for s in shards], 1)
    torch.testing.assert_close(down, full.layers[1].mlp.down_proj.weight)
