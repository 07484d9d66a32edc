"""Linear layers whose float32 weights are packed once, at load, for duo's few-row CPU matrix kernel.

A verification pass multiplies 1 to 64 rows by every weight matrix of the target. torch's CPU kernels
for 2-32 rows cost up to three times one row (they re-pack or re-read the weight on every call), which
is what makes speculation slow on a CPU. ``duo.common._packed_gemm`` streams each weight once per call
whatever the row count (see its source for the layout); ``PackedLinear`` holds the packed weight and
calls it. Each output is summed in a fixed order, so a row's result does not depend on how many rows
share the call (batch-invariant), unlike torch's kernels.

Each weight is stored in the smallest layout that holds it *exactly*: int8 with a float32 scale and offset
per 32 inputs when every value is scale * q + offset (weights dequantised from a GGUF file, like the
default target: 1.25 bytes a weight instead of 4), bfloat16 when every value is a bfloat16 (a bfloat16
checkpoint run in float32), else float32. The kernel widens a panel back to float32 in cache before
multiplying, so the products see the model's weights bit for bit and only fewer bytes come from memory,
which is what bounds a CPU forward pass over a few tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

try:
    from duo.common import _packed_gemm
except ImportError:  # not built on this machine (setup.py builds it where it can)
    _packed_gemm = None

PANEL = 32  # output columns per packed panel; PANEL in _packed_gemm.c
BLOCK = 32  # consecutive inputs sharing one scale and offset in the int8 format; BLOCK in _packed_gemm.c
FORMAT_F32, FORMAT_BF16, FORMAT_I8_BLOCKS = 0, 1, 2  # the kernel's storage formats


def instruction_sets() -> list[str]:
    """The kernel's instruction sets this CPU runs, best first ("avx512", "avx2"); empty where it cannot run."""
    return [] if _packed_gemm is None else _packed_gemm.instruction_sets()


def kernel_unavailable_reason() -> str | None:
    """None when the packed kernel can run here, else why not."""
    if _packed_gemm is None:
        return "duo.common._packed_gemm was not built (no C compiler at install, or not x86-64 Linux)"
    if not instruction_sets():
        return "this CPU has neither AVX-512F nor AVX2 with FMA"
    return None


def use_threads(threads: int) -> int:
    """Let every later product of this process use ``threads`` threads, the caller's included (the output
    columns are dealt out among them; each output is still one thread's chain, so results are the same bits
    whatever the count). Returns the number in effect."""
    return _packed_gemm.set_threads(threads)


@dataclass(frozen=True)
class PackedWeight:
    """A weight [N, K] in the kernel's panel layout: ``data`` [ceil(N / 32), K, 32] (zero padded), and for
    the int8 format ``scales`` and ``offsets`` [ceil(N / 32), K / 32, 32]."""

    format: int
    data: torch.Tensor
    scales: torch.Tensor | None = None
    offsets: torch.Tensor | None = None

    @property
    def format_name(self) -> str:
        return {FORMAT_F32: "float32", FORMAT_BF16: "bfloat16", FORMAT_I8_BLOCKS: "int8 blocks"}[self.format]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.offsets) if t is not None)

    def widened(self, rows: int) -> torch.Tensor:
        """The weight [rows, K] in float32, bit for bit the one that was packed."""
        panels, k, _ = self.data.shape
        if self.format == FORMAT_F32:
            full = self.data
        elif self.format == FORMAT_BF16:
            full = self.data.view(torch.bfloat16).float()
        else:  # (scale * q) + offset, as the packer checked and the kernel computes
            q = self.data.float().view(panels, k // BLOCK, BLOCK, PANEL)
            full = (q * self.scales[:, :, None, :] + self.offsets[:, :, None, :]).view(panels, k, PANEL)
        return full.transpose(1, 2).reshape(panels * PANEL, k)[:rows]


def to_panels(matrix: torch.Tensor) -> torch.Tensor:
    """[N, C] → [ceil(N / 32), C, 32], zero padded: panel p holds rows 32p .. 32p + 31 of ``matrix``."""
    n, columns = matrix.shape
    panels = -(-n // PANEL)
    padded = matrix.new_zeros(panels * PANEL, columns)
    padded[:n] = matrix
    return padded.view(panels, PANEL, columns).transpose(1, 2).contiguous()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: the same float32 bits (so -0.0 is not 0.0 and a NaN is never rebuilt)."""
    return a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)


def exact_int8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q int8 [N, K], scale, offset [N, K / 32] float32) with weight == scale * q + offset bit for bit in
    every block of 32 consecutive inputs, or None when some block is not of that form.

    Weights dequantised from GGUF's block formats are (Q4_1, Q5_1: q ≥ 0 with the block's minimum as offset;
    Q8_0, Q4_0, Q5_0: symmetric, no offset; scales on float16's grid). Each block takes the first candidate
    that rebuilds it exactly; nothing is approximated."""
    n, k = weight.shape
    if k % BLOCK:
        return None
    blocks = weight.reshape(n, k // BLOCK, BLOCK)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    largest = torch.where(high >= -low, high, low)  # the value of largest magnitude, signed
    zero = torch.zeros_like(low)
    candidates = (((high - low) / 15, low), ((high - low) / 31, low), (largest / 127, zero),
                  (largest / -8, zero), (largest / -16, zero))
    q = torch.zeros(blocks.shape, dtype=torch.int8)
    scale, offset = torch.zeros_like(low), torch.zeros_like(low)
    found = torch.zeros(low.shape, dtype=torch.bool)
    for raw_scale, candidate_offset in candidates:
        candidate_scale = raw_scale.half().float()  # GGUF stores block scales as float16
        safe = torch.where(candidate_scale == 0, torch.ones_like(candidate_scale), candidate_scale)
        levels = torch.round((blocks - candidate_offset) / safe).clamp(-128, 127)
        levels = torch.where(candidate_scale == 0, torch.zeros_like(levels), levels)
        rebuilt = candidate_scale * levels + candidate_offset
        exact = _same_bits(rebuilt, blocks).all(-1, keepdim=True) & ~found
        q = torch.where(exact, levels.to(torch.int8), q)
        scale = torch.where(exact, candidate_scale, scale)
        offset = torch.where(exact, candidate_offset, offset)
        found |= exact
        if bool(found.all()):
            return q.reshape(n, k), scale.reshape(n, k // BLOCK), offset.reshape(n, k // BLOCK)
    return None


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """The smallest exact layout of a float32 weight [N, K]: int8 blocks, else bfloat16, else float32."""
    weight = weight.detach().float().contiguous()
    blocks = exact_int8_blocks(weight)
    if blocks is not None:
        q, scale, offset = blocks
        return PackedWeight(FORMAT_I8_BLOCKS, to_panels(q), to_panels(scale), to_panels(offset))
    as_bf16 = weight.to(torch.bfloat16)
    if bool(_same_bits(as_bf16.float(), weight).all()):
        return PackedWeight(FORMAT_BF16, to_panels(as_bf16.view(torch.int16)))
    return PackedWeight(FORMAT_F32, to_panels(weight))


class PackedLinear(nn.Module):
    """``nn.Linear`` on the CPU in float32, computed by the packed kernel from the weight stored in its
    smallest exact format (the same weights bit for bit; results differ from torch's only in the order of
    floating-point sums)."""

    def __init__(self, linear: nn.Linear, instruction_set: str | None = None):
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes float32 CPU weights, not {weight.dtype} on {weight.device}")
        available = instruction_sets()
        if instruction_set is None and available:
            instruction_set = available[0]
        if instruction_set not in available:
            raise RuntimeError(f"the packed kernel cannot run {instruction_set or 'here'}: "
                               f"{kernel_unavailable_reason() or f'this CPU runs {available}'}")
        self.instruction_set = instruction_set
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_format = pack_weight(weight)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("bias", bias, persistent=False)

    @property
    def weight_format(self) -> PackedWeight:
        return self._weight_format

    @weight_format.setter
    def weight_format(self, packed: PackedWeight) -> None:
        self._weight_format = packed
        # The kernel's weight arguments, fixed for the weight's life: a forward pass makes ~120 calls.
        self._weight_args = (packed.data.data_ptr(), packed.format,
                             0 if packed.scales is None else packed.scales.data_ptr(),
                             0 if packed.offsets is None else packed.offsets.data_ptr(), self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on torch calls (each costs microseconds, and a forward pass makes ~120 of these calls).
        if x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != self.in_features:
            raise TypeError(f"PackedLinear takes float32 CPU inputs of {self.in_features} features, "
                            f"not {x.dtype} {tuple(x.shape)} on {x.device}")
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out = rows.new_empty(rows.shape[0], self.out_features)
        if rows.shape[0]:
            _packed_gemm.gemm(self.instruction_set, rows.data_ptr(), rows.shape[0], self.in_features,
                              *self._weight_args, out.data_ptr(), 0 if self.bias is None else self.bias.data_ptr())
        return out if flat else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights={self.weight_format.format_name}, kernel={self.instruction_set}")


def pack_linear_layers(model: nn.Module) -> Counter:
    """Replace every float32 ``nn.Linear`` of ``model`` by a ``PackedLinear``; returns how many layers got
    each storage format.

    Tied weights (an output layer sharing the embedding matrix) are packed separately: the embedding
    keeps its own table."""
    formats: Counter = Counter()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                packed = PackedLinear(child)
                setattr(parent, name, packed)
                formats[packed.weight_format.format_name] += 1
    return formats
