"""Where the recipe's stages run: the device, dtypes by their config names, the target model and wall-clock
budgets."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """``name`` as a torch device; "auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_target(target_dir: Path, dtype: torch.dtype, device: torch.device):
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device).eval()


class Deadline:
    """A wall-clock budget for a stage (``None`` seconds: no budget)."""

    def __init__(self, seconds: float | None):
        self.started = time.time()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.time() - self.started

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()
