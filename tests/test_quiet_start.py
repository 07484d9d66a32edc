"""A service starts without warnings: its model calls use transformers' current names (``cache=``, not the
deprecated ``past_key_values=``), on each CPU runtime. The service runs as a real process, since transformers
warns once per process."""

import pytest

from tests.conftest import KERNELS
from tests.test_shutdown import start, wait_serving
from tests.tiny_models import save_pair


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_the_verify_service_starts_without_warnings(tmp_path, arch, kernels):
    pair = save_pair(tmp_path, arch)
    process, address = start("duo.verify_service.cli", ["--model", str(pair.target_dir), "--device", "cpu",
                                                    "--threads", "1", "--cpu-kernels", kernels], tmp_path, "verify")
    try:
        wait_serving(address)  # the model is loaded and its tree-attention self-check has run
    finally:
        process.terminate()
        process.wait(timeout=60)
    log = (tmp_path / "verify.log").read_text()
    assert "serving" in log
    assert "deprecated" not in log.lower() and "warning" not in log.lower(), log
    assert "[transformers]" not in log, log  # transformers' own warnings, printed beside the logging module
