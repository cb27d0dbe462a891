"""MLAttention through a ContiguousKVCache (expanded prefill, absorbed decode over the stored rows, read in place as
pages of one token: the paged engine's decode path) == one pass without a cache."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import Batch, CacheKind, ContiguousKVCache, MLAttention, RotaryEmbedding
from attnzoo.ops import latent


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_cached_decode_matches_full_pass(q_lora_rank: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attn = MLAttention(0, 32, 4, q_lora_rank=q_lora_rank, kv_lora_rank=10, qk_nope_head_dim=6,
                       qk_rope_head_dim=4, v_head_dim=5).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    rotary = RotaryEmbedding(4, 10000.0)
    B, T, P = 2, 8, 5
    x = torch.randn(B, T, 32, dtype=torch.float64)
    full_batch = Batch.dense(B, T)
    with torch.no_grad():
        full = attn(x.reshape(B * T, 32), rotary(full_batch.positions), full_batch).view(B, T, 32)
    calls: list[str] = []
    real = latent.mla_paged_decode

    def spy(*a, **k):  # noqa: ANN002, ANN003 -- records that decode took the absorbed path
        calls.append("absorbed")
        return real(*a, **k)
    monkeypatch.setattr("attnzoo.layers.mla.mla_paged_decode", spy)
    cache = ContiguousKVCache(batch_size=B, max_len=T)
    outs = []
    with torch.no_grad():
        for start, n in [(0, P)] + [(t, 1) for t in range(P, T)]:
            b = Batch.dense(B, n, start, cache=cache)
            outs.append(attn(x[:, start:start + n].reshape(B * n, 32), rotary(b.positions), b).view(B, n, 32))
            cache.length += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert calls == ["absorbed"] * (T - P)
    assert cache.rows[(0, CacheKind.LATENT)].shape == (B, T, 10 + 4)  # only the latent and the shared rope key are cached
