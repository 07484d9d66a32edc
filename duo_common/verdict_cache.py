"""Verdicts of one-time model self-checks (does this model honour a tree attention mask?) kept in duo's cache
directory, so a service that loads the same model with the same code again skips the check.

A verdict is keyed by everything it depends on: the model's files (folder, names, sizes, modification
times), its class, configuration, dtype, device and attention implementation, the classes of its modules
(duo's CPU runtime replaces some), and the code that runs it (torch's and transformers' versions, duo's own
files). Any change of code or files gives a new key, so a stale verdict is never read; an unwritable cache
only costs the check. A model not loaded from a local folder has no key, nor has one in the temporary
directory (tests' models come and go there, and their verdicts would only pile up): they are checked at every
load."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

from duo.common.default_models import cache_root

log = logging.getLogger(__name__)

_DUO_CODE = Path(__file__).resolve().parent  # the modules (and C kernels) a forward pass may run through


def verdict_key(check: str, model) -> str | None:
    """The key of ``check``'s verdict on ``model``, or None where the model has no folder of its own."""
    folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if not folder.is_dir() or folder.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
        return None
    import torch
    import transformers

    parameter = next(model.parameters())
    described = {
        "check": check,
        "files": _files(folder),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": model.config.to_json_string(use_diff=False),
        "attention": str(getattr(model.config, "_attn_implementation", None)),
        "dtype": str(parameter.dtype),
        "device": str(parameter.device),
        "modules": sorted(Counter(f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()).items()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "duo": _files(_DUO_CODE),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def read_verdict(key: str) -> bool | None:
    try:
        return bool(json.loads(_path(key).read_text())["verdict"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_verdict(key: str, verdict: bool) -> None:
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps({"verdict": verdict}))
        os.replace(staging, path)
    except OSError as exc:
        log.debug("cannot keep the verdict in %s: %s", path, exc)


def _path(key: str) -> Path:
    return cache_root() / "self-checks" / f"{key}.json"


def _files(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, modification time) of the files directly in ``folder``."""
    found = []
    for entry in os.scandir(folder):
        if entry.is_file():
            stat = entry.stat()
            found.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return sorted(found)
