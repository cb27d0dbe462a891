"""How much memory the KV cache gets: what is free on the device at start-up (`available_memory`) and the
budget the engine's options ask for (`kv_budget`); engine/cache_plan.py then lays the budget out in pages."""

from __future__ import annotations

import torch

# The default KV budget: what max_num_seqs sequences at the full context need, but at most this share of
# the memory available at start-up (never less than one full-context sequence). Host RAM is shared with
# everything else on the machine, and the pool is paid for as it fills, so a cap that a busy server can
# really fill must be one the machine can spare; a larger budget is a flag away (kv_cache_memory/fraction).
DEFAULT_KV_CACHE_FRACTION = 0.1


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV cache: free GPU memory, or the host's MemAvailable, lowered to the cgroup's
    remaining limit inside a container (whose /proc/meminfo shows the host)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = 4 << 30  # no /proc: a guess that keeps the default budget small
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            free = min(free, int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return max(free, 0)


def gib(n: int) -> str:
    """Bytes for a log line: GiB, or MiB below one GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def kv_budget(fixed: int, per_seq: int, max_num_seqs: int, max_model_len: int, kv_cache_memory: int | None,
              kv_cache_fraction: float | None, available: int | None) -> tuple[int, str]:
    """The KV budget in bytes and, for the start-up log, where it came from. fixed + n * per_seq bytes hold
    n sequences of max_model_len tokens (`sequence_bytes`); available is None when kv_cache_memory is given."""
    if kv_cache_memory is not None:
        return kv_cache_memory, f"kv_cache_memory {gib(kv_cache_memory)}"
    if kv_cache_fraction is not None:
        return int(available * kv_cache_fraction), f"kv_cache_fraction {kv_cache_fraction:g} of {gib(available)}"
    cap = int(available * DEFAULT_KV_CACHE_FRACTION)
    n = max_num_seqs if per_seq == 0 else max(1, min(max_num_seqs, (cap - fixed) // per_seq))
    share = f"{DEFAULT_KV_CACHE_FRACTION:.0%} of {gib(available)} available"
    fits = f"within {share}" if fixed + n * per_seq <= cap else f"more than {share}: one sequence is the least"
    return fixed + n * per_seq, (f"default: {n} sequence{'s' * (n > 1)} of {max_model_len} tokens, max_num_seqs "
                                 f"{max_num_seqs}, {fits}")
