"""The operations between a Llama decoder layer's matrix products, each one C call (``_decoder_ops.c``).

On the packed CPU runtime the matrix products of a pass over a few tokens are cheap, and transformers'
norm, rotary, attention and activation code (30-40 small torch calls per layer) cost about as much again.
These functions do the same work on float32 CPU tensors, one call each. Each row's results depend on that
row alone (batch-invariant, like the packed kernel); elementwise steps round exactly as transformers' code
does and sums differ from torch's only in their order (``tests/test_decoder_ops.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from duo.common import _decoder_ops
except ImportError:  # not built on this machine (setup.py builds it where it can)
    _decoder_ops = None


# Queries up to this many tokens (proposals, decoding steps) are attended here; longer ones (prefills) by
# SDPA, which does not materialise the [query, key] score matrix.
SHORT_QUERY_TOKENS = 64


def available() -> bool:
    """Built here, and this CPU runs it."""
    return _decoder_ops is not None and _decoder_ops.cpu_supported()


def _check(tensor: torch.Tensor, name: str, dims: int) -> None:
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or tensor.dim() != dims \
            or not tensor.is_contiguous():
        raise ValueError(f"{name}: a contiguous {dims}-D float32 CPU tensor, not {tuple(tensor.shape)} "
                         f"{tensor.dtype} on {tensor.device} (contiguous: {tensor.is_contiguous()})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, dim] → weight * x / sqrt(mean(x²) + eps), per row (transformers' LlamaRMSNorm)."""
    _check(x, "x", 2)
    _check(weight, "weight", 1)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[0]} values for rows of {x.shape[1]}")
    out = torch.empty_like(x)
    _decoder_ops.rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def rotary_split(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of fused q|k|v projections [rows, (heads + 2 kv_heads) * head_dim] and the rows' rotary cos and
    sin [rows, head_dim] → q rotated [rows, heads, head_dim], k rotated and v, each
    [kv_heads, rows, head_dim] (the KV cache's layout)."""
    _check(qkv, "qkv", 2)
    _check(cos, "cos", 2)
    _check(sin, "sin", 2)
    rows = qkv.shape[0]
    if qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or head_dim % 2 \
            or cos.shape != (rows, head_dim) or sin.shape != (rows, head_dim):
        raise ValueError(f"qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} do not fit "
                         f"{heads} heads, {kv_heads} key/value heads of {head_dim}")
    q = qkv.new_empty(rows, heads, head_dim)
    k = qkv.new_empty(kv_heads, rows, head_dim)
    v = qkv.new_empty(kv_heads, rows, head_dim)
    _decoder_ops.rotary_split(qkv.data_ptr(), rows, heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
                              q.data_ptr(), k.data_ptr(), v.data_ptr())
    return q, k, v


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
              ) -> torch.Tensor:
    """Softmax attention of q [rows, heads, d] over keys and values [kv_heads, kv_len, d] (grouped-query:
    head h reads key/value head h // (heads / kv_heads); d a multiple of 8), → [rows, heads * d].

    ``mask`` [rows, kv_len] is added to the scores (-inf or the most negative float: not visible); None means
    causal, the rows being the last ``rows`` positions. keys and values may be views with room between heads
    (a cache's buffers)."""
    _check(q, "q", 3)
    rows, heads, d = q.shape
    kv_heads, kv_len = keys.shape[0], keys.shape[1]
    for name, tensor in (("keys", keys), ("values", values)):
        if tensor.dtype != torch.float32 or tensor.dim() != 3 or tensor.shape != (kv_heads, kv_len, d) \
                or tensor.stride()[1:] != (d, 1) or tensor.stride(0) != keys.stride(0):
            raise ValueError(f"{name}: [kv_heads, kv_len, {d}] float32 with contiguous positions, "
                             f"not {tuple(tensor.shape)} strides {tensor.stride()}")
    if heads % kv_heads or rows > kv_len or d % 8:
        raise ValueError(f"{heads} query heads over {kv_heads} key/value heads, {rows} rows over {kv_len} positions, "
                         f"head size {d} (a multiple of 8)")
    if mask is not None:
        _check(mask, "mask", 2)
        if mask.shape != (rows, kv_len):
            raise ValueError(f"mask {tuple(mask.shape)} for {rows} rows over {kv_len} positions")
    out = q.new_empty(rows, heads * d)
    _decoder_ops.attention(q.data_ptr(), rows, heads, kv_heads, d, keys.data_ptr(), values.data_ptr(),
                           keys.stride(0), kv_len, 0 if mask is None else mask.data_ptr(), kv_len - rows, scale,
                           out.data_ptr())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Rows of fused gate|up projections [rows, 2 width] → silu(gate) * up [rows, width]."""
    _check(gate_up, "gate_up", 2)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate|up rows of odd width {gate_up.shape[1]}")
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _decoder_ops.silu_mul(gate_up.data_ptr(), gate_up.shape[0], gate_up.shape[1] // 2, out.data_ptr())
    return out


def can_run_layers() -> bool:
    """Whole layers in one call (``layer_definition``) need the packed kernel's C interface too."""
    from duo.common.packed_linear import kernel_unavailable_reason

    return available() and kernel_unavailable_reason() is None


def _product(packed) -> tuple:
    """A PackedLinear as the C layer takes it (its buffers stay owned by the PackedLinear)."""
    weight = packed.weight_format
    return (weight.data.data_ptr(), weight.format, 0 if weight.scales is None else weight.scales.data_ptr(),
            0 if weight.offsets is None else weight.offsets.data_ptr(), packed.out_features, packed.in_features,
            0 if packed.bias is None else packed.bias.data_ptr())


def layer_definition(qkv, o_proj, gate_up, down, input_norm: torch.Tensor, input_eps: float, post_norm: torch.Tensor,
                     post_eps: float, heads: int, kv_heads: int, head_dim: int, scale: float):
    """A Llama decoder layer whose products are these PackedLinears (q|k|v and gate|up fused), for
    ``run_layer``. The caller keeps the products and norm weights alive as long as the definition."""
    hidden, intermediate = o_proj.out_features, down.in_features
    if (qkv.in_features != hidden or qkv.out_features != (heads + 2 * kv_heads) * head_dim
            or o_proj.in_features != heads * head_dim or gate_up.out_features != 2 * intermediate
            or gate_up.in_features != hidden or down.out_features != hidden
            or len({p.instruction_set for p in (qkv, o_proj, gate_up, down)}) != 1):
        raise ValueError("the layer's products do not fit together")
    for norm in (input_norm, post_norm):
        _check(norm, "norm weight", 1)
    return _decoder_ops.layer(qkv.instruction_set, hidden, heads, kv_heads, head_dim, intermediate,
                              input_norm.data_ptr(), input_eps, post_norm.data_ptr(), post_eps, scale,
                              _product(qkv), _product(o_proj), _product(gate_up), _product(down))


@dataclass(frozen=True)
class Segment:
    """One sequence's rows in a ``run_layer`` call: how many, its cache's key and value buffers
    [kv_heads, capacity, head_dim] holding ``past`` positions (the rows' keys and values are written after
    them), and its mask as ``attention`` takes it ([rows, past + rows]; None: causal)."""

    rows: int
    keys: torch.Tensor
    values: torch.Tensor
    past: int
    mask: torch.Tensor | None = None


def run_layer(definition, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment]
              ) -> None:
    """One decoder layer over hidden [rows, hidden size], in place: exactly what rms_norm, the products,
    rotary_split, attention and silu_mul compute one by one. The rows are the segments' rows in order (one
    segment per sequence: the products run over all rows at once, attention per segment over its own cache);
    cos and sin [rows, head_dim] are the rows' rotary tables."""
    rows = hidden.shape[0]
    _check(hidden, "hidden", 2)
    if cos.shape != sin.shape or cos.shape[0] != rows or sum(s.rows for s in segments) != rows or not segments:
        raise ValueError("run_layer: rows, rotary tables and segments do not fit")
    described = []
    for segment in segments:
        keys, values, mask = segment.keys, segment.values, segment.mask
        _check(keys, "keys", 3)
        _check(values, "values", 3)
        fits = mask is None or mask.shape == (segment.rows, segment.past + segment.rows)
        if keys.shape != values.shape or not fits:
            raise ValueError("run_layer: a segment's cache buffers and mask do not fit")
        if mask is not None:
            _check(mask, "mask", 2)
        described.append((segment.rows, keys.data_ptr(), values.data_ptr(), keys.shape[1], segment.past,
                          0 if mask is None else mask.data_ptr()))
    _decoder_ops.run_layer(definition, hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(), described)


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A [rows, kv_len] mask as ``attention`` takes it: bool (True = visible) or additive float."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    return mask.float().contiguous()
