"""Distil a draft model for duo's default target, SmolLM2-135M-Instruct, on a CPU or a GPU.

Run from the repository root: ``python -m recipes.distill_draft.distill --config FILE`` runs every stage;
``--stage`` runs one.

1. ``generate`` (``teacher_answers.py``): training and validation prompts, from the template bank
   (``prompt_bank.py``) or written by the target (``self_prompts.py``), answered by the target, which keeps
   its top-k next-token logits at every answer position.
2. ``train`` (``training.py``): a small Llama draft with the target's tokenizer, initialised from the target
   (``draft_init.py``) or from a trained draft, trained to match the target's next-token distribution on the
   answers, then scored on the validation answers by the tokens greedy speculative rounds would commit
   (``validation.py``).
3. ``export``: the draft in the shipped dtype, with the target's tokenizer files and a greedy generation
   config, in the config's ``output_dir``.

Every hyper-parameter and seed is in the config file (``recipe_config.py`` is its schema; README.md says
what each shipped config is for). ``--set key.sub=value`` overrides one entry. The target comes from
``duo.common.default_models.default_target_dir()``.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
from pathlib import Path

import torch
from duo.common.default_models import default_target_dir
from transformers import GenerationConfig, LlamaForCausalLM

from recipes.distill_draft.recipe_config import RecipeConfig, load_config, repo_path
from recipes.distill_draft.runtime import DTYPES
from recipes.distill_draft.teacher_answers import stage_generate
from recipes.distill_draft.training import run_dir, stage_train
from recipes.distill_draft.typed_json import ConfigError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def stage_export(cfg: RecipeConfig) -> None:
    output_dir = repo_path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target_dir = default_target_dir()
    draft = LlamaForCausalLM.from_pretrained(run_dir(cfg) / "draft_fp32", dtype=torch.float32)
    draft = draft.to(DTYPES[cfg.export.dtype])
    draft.config.dtype = cfg.export.dtype
    draft.save_pretrained(output_dir, max_shard_size=cfg.export.max_shard_size)
    for name in TOKENIZER_FILES:
        if (target_dir / name).exists():
            shutil.copy2(target_dir / name, output_dir / name)
    GenerationConfig(bos_token_id=draft.config.bos_token_id, eos_token_id=draft.config.eos_token_id,
                     pad_token_id=draft.config.pad_token_id, do_sample=False).save_pretrained(output_dir)
    log.info("exported the draft (%s) to %s", cfg.export.dtype, output_dir)


STAGES = {"generate": stage_generate, "train": stage_train, "export": stage_export}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "config.json")
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config entry, e.g. --set draft.num_hidden_layers=3")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    for name, stage in STAGES.items():
        if args.stage in (name, "all"):
            log.info("stage %s", name)
            stage(cfg)


if __name__ == "__main__":
    main()
