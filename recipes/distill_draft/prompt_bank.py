"""Template chat prompts for distilling duo's default draft model.

The words and templates are data, in ``prompt_bank.toml`` beside this file (its header says how a template's
fields are filled): families of request (questions, explanations, advice, stories, poems, code, maths,
writing, cooking, travel, troubleshooting, riddles and more), each with a weight, crossed with hand-written
word lists. ``build_prompts`` draws distinct prompts with a seeded RNG, so a seed always gives the same
prompts.
"""

from __future__ import annotations

import random
import re
import string
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BANK_FILE = Path(__file__).resolve().with_name("prompt_bank.toml")
ATTEMPTS_PER_PROMPT = 200  # draws allowed per distinct prompt before the bank counts as too small


@dataclass(frozen=True)
class Family:
    """One kind of request: its templates, drawn ``weight`` times as often as a family of weight 1."""

    name: str
    weight: int
    templates: tuple[str, ...]


@dataclass(frozen=True)
class PromptBank:
    """Families of templates and the pools their fields draw from (word lists and number ranges by name)."""

    families: tuple[Family, ...]
    pools: dict[str, Sequence]

    def __post_init__(self):
        for family in self.families:
            for template in family.templates:
                for field in template_fields(template):
                    if pool_name(field) not in self.pools:
                        raise ValueError(f"{family.name}: template {template!r} uses {{{field}}}, "
                                         f"which names no word list or number range")

    def render(self, template: str, rng: random.Random) -> str:
        """``template`` with its fields filled; fields naming the same pool take different values."""
        fields_by_pool: dict[str, list[str]] = {}
        for field in template_fields(template):
            fields_by_pool.setdefault(pool_name(field), []).append(field)
        values = {}
        for pool, fields in fields_by_pool.items():
            values.update(zip(fields, rng.sample(self.pools[pool], len(fields))))
        text = template.format(**values)
        return text[:1].upper() + text[1:]

    def draw(self, rng: random.Random) -> str:
        """One prompt: a family by weight, one of its templates, its fields filled."""
        family = rng.choices(self.families, weights=[f.weight for f in self.families])[0]
        return self.render(rng.choice(family.templates), rng)


def template_fields(template: str) -> list[str]:
    """The distinct field names of a template in order of appearance: ``{trouble[thing]}`` gives ``trouble``."""
    names = [re.split(r"[.\[]", field)[0] for _, field, _, _ in string.Formatter().parse(template) if field]
    return list(dict.fromkeys(names))


def pool_name(field: str) -> str:
    """The pool a field draws from: its name without a trailing number (``character2`` -> ``character``)."""
    return field.rstrip("0123456789")


def load_bank(path: Path = BANK_FILE) -> PromptBank:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    families = tuple(Family(name, spec["weight"], tuple(spec["templates"])) for name, spec in data["families"].items())
    pools: dict[str, Sequence] = dict(data["words"])
    pools.update({name: range(low, high + 1) for name, (low, high) in data["numbers"].items()})
    return PromptBank(families, pools)


def build_prompts(count: int, seed: int, bank: PromptBank | None = None) -> list[str]:
    """``count`` distinct training prompts, the same for the same seed and bank."""
    bank = bank or load_bank()
    rng = random.Random(seed)
    prompts: dict[str, None] = {}  # insertion-ordered set
    for _ in range(count * ATTEMPTS_PER_PROMPT):
        if len(prompts) == count:
            return list(prompts)
        prompts[bank.draw(rng)] = None
    if len(prompts) == count:
        return list(prompts)
    raise ValueError(f"cannot draw {count} distinct prompts; only {len(prompts)} found")
