"""duo installs under one import name, ``duo``: a user's environment gains no top-level ``client`` or ``protos``
that could collide with other packages. Built as pip builds it, from this checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_only_the_duo_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("duo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"duo", next(t for t in top_level if t.endswith(".dist-info"))}, top_level
    for module in ("duo/common/acceptance.py", "duo/protos/duo_pb2.py", "duo/protos/duo.proto",
                   "duo/client/cli.py", "duo/draft_service/servicer.py", "duo/verify_service/engine.py"):
        assert module in names, module
    assert not any(name.startswith("duo/__init__") for name in names)  # a namespace: nothing runs on import


def test_the_source_imports_the_project_by_its_installed_names():
    old = ("duo_common", "draft_service", "verify_service", "client", "protos")
    offenders = []
    for path in [*ROOT.glob("*/**/*.py")]:
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if len(words) >= 2 and words[0] in ("from", "import") and words[1].split(".")[0] in old:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
