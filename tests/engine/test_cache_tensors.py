"""`CacheTensors.apply` against hand-computed tensor contents (zeroing, copies, their order), and the
instructions the page accounting records for them: a snapshot taken as a request finishes lands before the
slot's next owner zeroes it, and a hit on it restores exactly the finished request's states."""

from __future__ import annotations

import pytest
import torch

from attnzoo.engine.cache_tensors import CacheTensors, RestoreState, SaveState, ZeroPages, ZeroState
from attnzoo.engine.paged_cache import PagedKVCache
from attnzoo.engine.request import Request
from attnzoo.engine.sampling import SamplingParams
from attnzoo.layers.cache_spec import FullKV, LatentKV, RecurrentState, SlidingKV

PS = 4
STATE = RecurrentState(conv_dim=6, conv_width=4, num_heads=2, k_dim=3, v_dim=5)
# layer 0 full K/V, layer 1 a latent (same table, other tensor layout), layer 2 sliding, layer 3 recurrent
SPECS = [FullKV(2, 8), LatentKV(6), SlidingKV(2, 8, window=8), STATE]


def build(**kw) -> tuple[PagedKVCache, CacheTensors]:
    kv = PagedKVCache(SPECS, num_pages=12, page_size=PS, num_state_slots=3, num_snapshots=2, **kw)
    cache = CacheTensors(SPECS, kv.layout, torch.float32)
    g = torch.Generator().manual_seed(0)
    for t in all_tensors(cache):
        t.copy_(torch.randn(t.shape, generator=g))
    return kv, cache


def all_tensors(cache: CacheTensors) -> list[torch.Tensor]:
    out = [t for grp in cache.groups for t in grp.tensors.values()]
    for pool in (cache.states, cache.snapshots):
        out += [*pool.conv.values(), *pool.state.values()]
    return out


def states(pool, slot: int) -> list[torch.Tensor]:
    return [pool.conv[3][slot].clone(), pool.state[3][slot].clone()]


def assert_states(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_zero_pages_clears_those_pages_of_every_group_on_the_table_only() -> None:
    _, cache = build(enable_prefix_caching=False)
    full, latent, sliding = cache.groups
    assert (full.table, latent.table, sliding.table) == (0, 0, 1)
    before = [t.clone() for t in all_tensors(cache)]
    want = [t.clone() for t in before]
    for p in (1, 3, 5):
        want[0][:, :, p] = 0   # full K [layers, Hkv, pages, page_size, d]
        want[1][:, :, p] = 0   # full V
        want[2][:, p] = 0      # latent rows [layers, pages, page_size, D]
    cache.apply([ZeroPages(0, (1, 3)), ZeroPages(0, (5,))])
    # the sliding table's pages (tensors 3, 4) and every state are untouched
    assert all(torch.equal(t, w) for t, w in zip(all_tensors(cache), want))
    assert not torch.equal(want[0], before[0])


def test_state_instructions_run_in_the_order_recorded() -> None:
    _, cache = build(enable_prefix_caching=False)
    s0, s2 = states(cache.states, 0), states(cache.states, 2)
    # keep slot 0's states in snapshot 1, then its next owner zeroes it, then a hit restores them into slot 2
    cache.apply([SaveState(0, 1), ZeroState(0), RestoreState(1, 2)])
    assert_states(states(cache.snapshots, 1), s0)
    assert_states(states(cache.states, 0), [torch.zeros_like(t) for t in s0])
    assert_states(states(cache.states, 2), s0)
    # the other order keeps zeros: the order is what makes the snapshot right
    _, cache = build(enable_prefix_caching=False)
    cache.apply([ZeroState(0), SaveState(0, 1), RestoreState(1, 2)])
    assert_states(states(cache.snapshots, 1), [torch.zeros_like(t) for t in s0])
    assert not torch.equal(states(cache.states, 2)[1], s2[1])
    with pytest.raises(TypeError):
        cache.apply(["zero everything"])


def test_a_snapshot_taken_at_finish_survives_the_slot_being_reused() -> None:
    kv, cache = build()
    assert kv.radix is not None and kv.snapshots is not None
    ops = kv.take_ops()
    assert ops == [ZeroPages(0, (0,)), ZeroPages(1, (0,))] and kv.take_ops() == []
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50, (9,), generator=g).tolist()
    a = Request("a", prompt, SamplingParams(max_tokens=1))
    kv.match_prefix(a)
    assert a.keep_at == {8} and kv.allocate(a, 8)
    slot = a.state_slot
    assert kv.take_ops() == [ZeroPages(0, (0, 1)), ZeroPages(1, (0, 1)), ZeroState(slot)]
    computed = states(cache.states, slot)      # what a's forward would have left in its slot
    a.num_computed = 8
    kv.free(a)                                 # finishes at its keep point: the tree snapshots its states
    b = Request("b", [50 + t for t in prompt], SamplingParams(max_tokens=1))
    kv.match_prefix(b)
    assert kv.allocate(b, 8) and b.state_slot == slot   # the freed slot is the next one taken
    c = Request("c", prompt + [7, 8], SamplingParams(max_tokens=1))
    kv.match_prefix(c)                         # hits a's 8 tokens, ending at the snapshot
    assert c.num_computed == 8 and kv.allocate(c, 11)
    ops = kv.take_ops()
    snap = next(op.snapshot for op in ops if isinstance(op, SaveState))
    assert ops.index(SaveState(slot, snap)) < ops.index(ZeroState(slot)) < ops.index(RestoreState(snap, c.state_slot))
    cache.apply(ops)
    assert_states(states(cache.snapshots, snap), computed)
    assert_states(states(cache.states, c.state_slot), computed)
    assert_states(states(cache.states, slot), [torch.zeros_like(t) for t in computed])
    kv.check_integrity([b, c])


def test_ranks_with_other_cache_groups_are_refused() -> None:
    kv, _ = build()
    with pytest.raises(ValueError, match="ranks disagree"):
        CacheTensors(SPECS[:2] + [STATE], kv.layout, torch.float32)
