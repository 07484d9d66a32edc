"""Decoding and stopping parameters: validated, frozen, shared by every component."""

from __future__ import annotations

import math
from dataclasses import dataclass

from duo.common.errors import InvalidArgument

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# Below this, sampling is greedy in all but name, and float32 logits divided by it overflow (1e-45 gave NaN
# probabilities); ask for temperature 0.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class DecodingParams:
    """How a token is chosen from logits. ``temperature == 0`` is greedy, an exact path of its own."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidArgument(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}; "
                "below that, sampling is greedy in all but name"
            )
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_seeded_sampling(self) -> bool:
        """Sampling whose every token is fixed by the seed and its position (``sampling.race_noise``)."""
        return self.seed is not None and not self.is_greedy

    @property
    def needs_draft_probs(self) -> bool:
        """Unseeded sampling: the verifier accepts each drafted token against the distribution it was drawn
        from. Greedy and seeded sampling fix the target's tokens without looking at the draft's."""
        return not self.is_greedy and self.seed is None


@dataclass(frozen=True)
class StoppingParams:
    """When generation ends: the first of max_new_tokens, an EOS token or a stop string."""

    max_new_tokens: int = 128
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop_strings)}")
        for stop in self.stop_strings:
            if not stop or len(stop) > MAX_STOP_STRING_CHARS:
                raise InvalidArgument(
                    f"stop strings must have 1 to {MAX_STOP_STRING_CHARS} characters, got one of {len(stop)}"
                )
