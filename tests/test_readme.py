"""The README documents every environment variable the services read."""

from pathlib import Path

import pytest

from duo.draft_service.cli import serve as draft_serve
from duo.verify_service.cli import serve as verify_serve

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("command", [verify_serve, draft_serve], ids=["verify", "draft"])
def test_every_serve_flag_has_its_environment_variable_in_the_readme(command):
    missing = [param.envvar for param in command.params if param.envvar and f"`{param.envvar}`" not in README]
    assert not missing, f"README's configuration table lacks {missing}"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    assert "bash scripts/quickstart.sh" in README and "bash scripts/test.sh" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
