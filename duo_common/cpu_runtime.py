"""How a loaded model runs its forward pass on a CPU: the one place where duo swaps kernels.

``--cpu-kernels`` (both services) chooses:
  torch   transformers' model as loaded: torch's matrix kernels and SDPA attention.
  packed  every float32 linear layer through duo's packed few-row kernel (``packed_linear``: each weight
          in its smallest exact storage, streamed once per pass), and attention that takes grouped-query
          heads without copying the cache for each query head; Llama models also get a leaner forward
          pass (``lean_llama``: fused projections, and the operations between products as C calls,
          ``decoder_ops``). A forward pass over 8 tokens then costs little more than over one on an
          AVX-512 CPU (``benchmarks/forward_cost.py``). The products use as many threads as torch does
          (the service's ``--threads``); the operations between them run on one.
  auto    packed where it applies (CPU device, float32 weights, the kernel built and the CPU able to run
          it), else torch.
Neither choice changes the model's weights (packed layers hold the same values bit for bit) or its dtype;
results differ from torch's kernels only in the order of floating-point sums and in exp() (``tests/
test_cpu_runtime.py`` and ``tests/test_decoder_ops.py`` check logits and greedy outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duo.common.cli_options import KERNEL_CHOICES
from duo.common.decoder_ops import SHORT_QUERY_TOKENS
from duo.common.default_models import ModelNotAvailableError
from duo.common.lean_llama import install_lean_forward, supports_lean_forward
from duo.common.packed_linear import kernel_unavailable_reason, pack_linear_layers, use_threads
ATTENTION_NAME = "duo_grouped_query"


class RuntimeUnavailableError(ModelNotAvailableError):
    """``--cpu-kernels packed`` was asked for where it cannot run."""


@dataclass(frozen=True)
class CpuRuntime:
    kernels: str  # "packed" or "torch": what actually runs
    packed_formats: tuple[tuple[str, int], ...] = ()  # (weight storage format, linear layers stored so)
    reason: str = ""  # why ``auto`` chose torch
    lean_forward: bool = False  # a Llama model runs duo's lean forward pass (``lean_llama``)
    decoder_ops: bool = False  # ... with the operations between its products in C (``decoder_ops``)
    threads: int = 1  # threads of the packed products

    @property
    def packed_layers(self) -> int:
        return sum(count for _, count in self.packed_formats)

    def describe(self) -> str:
        if self.kernels == "packed":
            formats = ", ".join(f"{count} {name}" for name, count in self.packed_formats)
            forward = ", lean Llama forward" if self.lean_forward else ""
            forward += " with C decoder operations" if self.decoder_ops else ""
            threads = f" on {self.threads} threads" if self.threads > 1 else ""
            return f"packed kernels{threads} (products: {formats or 'none'}), grouped-query attention{forward}"
        return "torch kernels" + (f" ({self.reason})" if self.reason else "")


def apply_cpu_runtime(model: torch.nn.Module, choice: str) -> CpuRuntime:
    """Prepare ``model`` (loaded, eval mode) for ``choice`` in KERNEL_CHOICES; returns what was applied."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown CPU kernels {choice!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    if choice == "torch":
        return CpuRuntime("torch")
    reason = _packed_unavailable_reason(model)
    if reason:
        if choice == "packed":
            raise RuntimeUnavailableError(f"--cpu-kernels packed cannot run here: {reason}")
        return CpuRuntime("torch", reason=reason)
    threads = use_threads(torch.get_num_threads())
    if supports_lean_forward(model):
        formats = install_lean_forward(model, grouped_query_attention)
        return CpuRuntime("packed", packed_formats=tuple(sorted(formats.items())), lean_forward=True,
                          decoder_ops=model._duo_decoder_ops, threads=threads)
    _use_grouped_query_attention(model)
    formats = pack_linear_layers(model)
    return CpuRuntime("packed", packed_formats=tuple(sorted(formats.items())), threads=threads)


def packed_kernels_will_run(choice: str) -> bool:
    """Whether ``choice`` gives the packed kernels to a float32 CPU model in this process."""
    return choice != "torch" and kernel_unavailable_reason() is None


def _packed_unavailable_reason(model: torch.nn.Module) -> str | None:
    parameter = next(model.parameters())
    if parameter.device.type != "cpu":
        return f"the model runs on {parameter.device}"
    if parameter.dtype != torch.float32:
        return f"the model runs in {str(parameter.dtype).removeprefix('torch.')} (the kernel is float32)"
    return kernel_unavailable_reason()


def _use_grouped_query_attention(model: torch.nn.Module) -> None:
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return  # eager or custom attention stays as the model chose it
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, grouped_query_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)


def grouped_query_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Attention that hands grouped-query heads to the kernels as they are.

    transformers' SDPA function copies every key/value head once per query head (repeat_kv) whenever there
    is a mask, which on a CPU costs more than the attention itself for a few query tokens. Here a short
    query (a proposal, a decoding step) is scored per key/value head with all of its query heads at once,
    in plain matrix products (each query row's result does not depend on how many rows share the call);
    a long one (a prefill) goes to SDPA with ``enable_gqa``, which never materialises the score matrix.

    query [b, heads, q, d]; key, value [b, kv_heads, kv, d]; attention_mask None, bool (True = visible) or
    additive float, [b, 1 or heads, q, kv]. Returns ([b, q, heads, d], None) like transformers' SDPA.
    Dropout and extras (soft-capping, attention sinks, position bias…) go to transformers' SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    extras = any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks", "position_bias"))
    if dropout or extras or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    # transformers leaves out a purely causal mask (a prefill without cache) and expects is_causal instead.
    causal = attention_mask is None and length > 1 and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if length > SHORT_QUERY_TOKENS:
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale, is_causal=causal, enable_gqa=heads != kv_heads)
        return output.transpose(1, 2).contiguous(), None
    if causal:
        past = key.shape[-2] - length
        attention_mask = torch.ones(length, past + length, dtype=torch.bool, device=query.device).tril(past)[None, None]
    groups = heads // kv_heads
    # Query heads h = j * groups + g share key/value head j (the layout of transformers' repeat_kv).
    scores = torch.matmul(query.reshape(batch, kv_heads, groups * length, dim), key.transpose(2, 3)) * scale
    scores = scores.view(batch, kv_heads, groups, length, -1)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.view(batch, kv_heads, groups, length, -1)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights.view(batch, kv_heads, groups * length, -1), value)
    return output.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None
