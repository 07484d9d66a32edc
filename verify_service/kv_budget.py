"""How many KV-cache positions the verify service may hold over all its sessions (``--kv-cache-tokens``).

A session's cache grows with its sequence and is never evicted while the session runs, so the bound is kept
where sessions start: a new session is refused (RESOURCE_EXHAUSTED) when the positions held, plus its
prompt, would pass the bound. The default takes half the memory free at start-up (the GPU's on CUDA; in a
container, at most what its memory limit leaves), divided by what one position costs the model (keys and
values of every layer).
"""

from __future__ import annotations

import torch

FREE_MEMORY_SHARE = 0.5


def bytes_per_position(config, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one sequence position."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


# (limit, usage) files of cgroup v2 and v1: a container's memory limit, which /proc/meminfo does not show
CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def free_memory_bytes(device: torch.device, cgroup_files=CGROUP_MEMORY_FILES, meminfo: str = "/proc/meminfo") -> int:
    """Memory free now on ``device``: the GPU's on CUDA, else the machine's available memory, or what is left
    under this container's memory limit if that is less."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = 8 << 30  # no /proc/meminfo: assume a modest machine
    try:
        with open(meminfo) as lines:
            fields = dict(line.split(":", 1) for line in lines)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    for limit_file, usage_file in cgroup_files:
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                limit_text, used = limit.read().strip(), int(usage.read())
        except (OSError, ValueError):
            continue
        if limit_text != "max" and int(limit_text) < 1 << 60:  # v1 writes a huge number for "no limit"
            free = min(free, max(0, int(limit_text) - used))
        break
    return free


def default_kv_cache_tokens(model: torch.nn.Module) -> int:
    parameter = next(model.parameters())
    per_position = bytes_per_position(model.config, parameter.dtype)
    return max(1, int(free_memory_bytes(parameter.device) * FREE_MEMORY_SHARE) // per_position)
