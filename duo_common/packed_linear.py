"""Linear layers whose float32 weights are packed once, at load, for duo's few-row CPU matrix kernel.

A verification pass multiplies 1 to 64 rows by every weight matrix of the target. torch's CPU kernels
for 2-32 rows cost up to three times one row (they re-pack or re-read the weight on every call), which
is what makes speculation slow on a CPU. ``duo_common._packed_gemm`` streams each weight once per call
whatever the row count (see its source for the layout); ``PackedLinear`` holds the packed weight and
calls it. Each output is summed in a fixed order, so a row's result does not depend on how many rows
share the call (batch-invariant), unlike torch's kernels.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from duo_common import _packed_gemm
except ImportError:  # not built on this machine (setup.py builds it where it can)
    _packed_gemm = None

PANEL = 32  # output columns per packed panel; must match PANEL in _packed_gemm.c


def kernel_unavailable_reason() -> str | None:
    """None when the packed kernel can run here, else why not."""
    if _packed_gemm is None:
        return "duo_common._packed_gemm was not built (no C compiler at install, or not x86-64 Linux)"
    if not _packed_gemm.avx512_supported():
        return "this CPU has no AVX-512F"
    return None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] → panels [ceil(N / 32), K, 32], zero padded: panel p holds columns 32p .. 32p + 31."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.float32)
    padded[:n] = weight
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


class PackedLinear(nn.Module):
    """``nn.Linear`` on the CPU in float32, computed by the packed kernel (same parameters, same result up
    to the order of floating-point sums)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes float32 CPU weights, not {weight.dtype} on {weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", pack_weight(weight), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"PackedLinear takes float32 CPU inputs, not {x.dtype} on {x.device}")
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        if rows.shape[0]:
            _packed_gemm.gemm(rows.data_ptr(), rows.shape[0], self.in_features, self.packed.data_ptr(),
                              self.out_features, out.data_ptr(), 0 if self.bias is None else self.bias.data_ptr())
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every float32 ``nn.Linear`` of ``model`` by a ``PackedLinear``; returns how many.

    Tied weights (an output layer sharing the embedding matrix) are packed separately: the embedding
    keeps its own table."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced
