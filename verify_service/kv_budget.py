"""How many KV-cache positions the verify service may hold over all its sessions (``--kv-cache-tokens``).

A session's cache grows with its sequence and is never evicted while the session runs, so the bound is kept
where sessions start: a new session is refused (RESOURCE_EXHAUSTED) when the positions held, plus its
prompt, would pass the bound. The default takes half the memory free at start-up (the GPU's on CUDA),
divided by what one position costs the model (keys and values of every layer).
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


def free_memory_bytes(device: torch.device) -> int:
    """Memory free now on ``device``: the GPU's on CUDA, else the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30  # no /proc/meminfo: assume a modest machine


def default_kv_cache_tokens(model: torch.nn.Module) -> int:
    parameter = next(model.parameters())
    per_position = bytes_per_position(model.config, parameter.dtype)
    return max(1, int(free_memory_bytes(parameter.device) * FREE_MEMORY_SHARE) // per_position)
