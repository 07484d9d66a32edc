"""``duo-client generate`` against a running pair starts fast: its whole path, from the command line to the
finished generation, imports neither torch nor transformers (seconds of imports; the services have the
models). Run in a fresh interpreter, since this test process has imported them both."""

import json
import subprocess
import sys

from tests.inprocess import running_pair
from tests.tiny_models import save_pair

HEAVY = ("torch", "transformers")

GENERATE_AND_LIST_HEAVY_MODULES = """
import json, sys
from duo.client.cli import main
main(["generate", "--draft-addr", sys.argv[1], "--json", "--max-new-tokens", "4", "w1 w2"], standalone_mode=False)
print(json.dumps(sorted(name for name in {heavy!r} if name in sys.modules)))
"""


def test_generating_with_a_running_pair_imports_neither_torch_nor_transformers(tmp_path):
    pair = save_pair(tmp_path, "llama")
    with running_pair(pair.target_dir, pair.draft_dir) as services:
        completed = subprocess.run(
            [sys.executable, "-c", GENERATE_AND_LIST_HEAVY_MODULES.format(heavy=HEAVY), services.draft_addr],
            capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result, imported = completed.stdout.strip().splitlines()
    assert json.loads(result)["stats"]["new_tokens"] == 4  # the generation really ran
    assert json.loads(imported) == []
