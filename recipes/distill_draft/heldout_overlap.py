"""Keeping the held-out benchmark held out: training prompts may neither equal a held-out prompt nor share a
run of words with one, compared on lower-case words only, so case and punctuation cannot hide a copy."""

from __future__ import annotations

import re

SHINGLE_SIZE = 6  # words in the shortest run that counts as shared


def normalize(text: str) -> str:
    """Lower-case words only, for overlap checks."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def shingles(text: str, size: int = SHINGLE_SIZE) -> set[str]:
    """Every run of ``size`` consecutive normalized words in ``text``."""
    words = normalize(text).split()
    return {" ".join(words[i:i + size]) for i in range(max(0, len(words) - size + 1))}


def assert_disjoint(train_prompts: list[str], heldout_prompts: list[str]) -> None:
    """Fail if any held-out prompt equals a training prompt or shares a ``SHINGLE_SIZE``-word run with one."""
    train_norm = {normalize(p) for p in train_prompts}
    train_shingles: set[str] = set()
    for prompt in train_prompts:
        train_shingles |= shingles(prompt)
    for prompt in heldout_prompts:
        if normalize(prompt) in train_norm:
            raise AssertionError(f"held-out prompt is also a training prompt: {prompt!r}")
        shared = shingles(prompt) & train_shingles
        if shared:
            raise AssertionError(f"held-out prompt {prompt!r} overlaps training prompts on {sorted(shared)[:3]}")
