"""Loading a Hugging Face causal LM and describing it (ModelInfo) for compatibility checks.

torch (and transformers) are imported by the functions that load or touch a model, not by this module: a
client reads ModelInfo from here, and talking to a running pair must not cost it torch's import."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from duo.common.default_models import ModelNotAvailableError, check_local_model, resolve_model
from duo.common.progress import hide_progress_bars_off_terminal, reported

if TYPE_CHECKING:
    import torch

    from duo.common.cpu_runtime import CpuRuntime

log = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the --dtype choices besides auto (torch's names)


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    eos_token_ids: tuple[int, ...]
    max_context_tokens: int
    device: str
    dtype: str
    max_tree_nodes: int = 0
    tree_attention: bool = False  # scores branching trees in one pass (checked at load); False: chains only


def _torch_kernels() -> CpuRuntime:
    from duo.common.cpu_runtime import CpuRuntime

    return CpuRuntime("torch")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    runtime: CpuRuntime = field(default_factory=_torch_kernels)


def pick_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotAvailableError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """``auto``: bfloat16 on CUDA; on the CPU the checkpoint's own dtype ("auto" for from_pretrained), so a
    float32 target stays exact and a draft shipped in bfloat16 runs in bfloat16."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else "auto"
    if dtype not in DTYPE_NAMES:
        raise ModelNotAvailableError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, dtype)


def load_causal_lm(name: str, device: str = "auto", dtype: str = "auto", cpu_kernels: str = "auto") -> LoadedModel:
    """Load model and tokenizer from a hub id, a local folder or a ``builtin:`` name; eval mode, prepared
    for ``cpu_kernels`` (``duo.common.cpu_runtime``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from duo.common.cpu_runtime import apply_cpu_runtime

    check_local_model(name)
    path = resolve_model(name)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    hide_progress_bars_off_terminal()
    with reported(log, f"loading {name}"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise ModelNotAvailableError(load_failure(name, exc)) from exc
        model.to(torch_device).eval()
    info = ModelInfo(
        model_name=name,
        vocab_size=output_vocab_size(model),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        eos_token_ids=eos_token_ids(model, tokenizer),
        max_context_tokens=_max_context(model.config),
        device=str(torch_device),
        dtype=str(model.dtype).removeprefix("torch."),
    )
    with reported(log, f"preparing the CPU kernels of {name}"):
        runtime = apply_cpu_runtime(model, cpu_kernels)
    log.info("loaded %s on %s (%s, %s): vocab %d, context %d", name, info.device, info.dtype, runtime.describe(),
             info.vocab_size, info.max_context_tokens)
    return LoadedModel(model, tokenizer, info, runtime)


def load_failure(name: str, exc: BaseException) -> str:
    """Why ``name`` did not load, in one line that says what to do."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, LocalEntryNotFoundError):
            return (f"{name} is not a local folder, and the Hugging Face hub cannot be reached to download it: "
                    "give the path of a local model folder (or connect to the internet)")
        cause = cause.__cause__ or cause.__context__
    lines = str(exc).strip().splitlines()
    return f"cannot load {name!r} as a causal language model: {lines[0] if lines else type(exc).__name__}"


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the output layer (its ``out_features``: a packed layer keeps no ``weight``)."""
    output = model.get_output_embeddings()
    return int(getattr(output, "out_features", None) or output.weight.shape[0])


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over token → id pairs and special tokens: equal fingerprints mean the ids mean the same."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special": sorted(str(token) for token in tokenizer.all_special_tokens),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """EOS ids from the generation config (may be a list), else the tokenizer."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return ()
    return tuple(sorted({int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}))


def _max_context(config) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def truncate_cache(cache, keep_tokens: int) -> None:
    """Roll a DynamicCache back to its first ``keep_tokens`` positions."""
    excess = cache.get_seq_length() - keep_tokens
    if excess > 0:
        cache.crop(-excess)


def select_cache_positions(cache, keep_from: int, positions: torch.Tensor) -> None:
    """Keep the cache's first ``keep_from`` positions followed by ``positions`` (absolute, ascending).

    Used after tree verification: the accepted path's entries are scattered among rejected siblings. They
    move down in place (each to a slot at or before its own), then the cache is cropped behind them.
    """
    import torch

    keep = keep_from + len(positions)
    with torch.inference_mode():
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            index = positions.to(layer.keys.device)
            layer.keys[..., keep_from:keep, :] = layer.keys.index_select(-2, index)
            layer.values[..., keep_from:keep, :] = layer.values.index_select(-2, index)
            layer.keys = layer.keys[..., :keep, :]
            layer.values = layer.values[..., :keep, :]
