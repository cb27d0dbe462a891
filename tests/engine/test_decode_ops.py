"""A regression guard on the eager decode step's metadata: built once per step, not per request. (The compiled
step's Python work is tested in test_graph.py.)"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnzoo.engine import LLM, SamplingParams
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM

class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _llm(layers: int, dtype: torch.dtype, seqs: int) -> LLM:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    model = DecoderLM(cfg).to(dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return LLM(model, max_num_seqs=seqs, kv_cache_memory=4 << 20, page_size=4, enable_prefix_caching=False)


def _decode_ops(llm: LLM, seqs: int) -> Counter[str]:
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for i in range(seqs):
        llm.add_request([(3 * i + t) % 100 + 1 for t in range(9)], params)
    llm.step()                      # prefill
    llm.step()                      # a decode step, warm
    with _Count() as c:
        llm.runner.execute(llm.runner.prepare(llm.scheduler.schedule())[0])
    return c.ops


def test_step_metadata_does_not_grow_with_the_batch():
    """Ops outside the layers (step metadata, embeddings, the head) are the same for 2 and 32 sequences:
    nothing is built per request."""
    few, many = _decode_ops(_llm(2, torch.float32, 2), 2), _decode_ops(_llm(2, torch.float32, 32), 32)
    assert sum(many.values()) == sum(few.values()), (many - few) + (few - many)
