"""A service starts without warnings: its model calls use transformers' current names (``cache=``, not the
deprecated ``past_key_values=``), on each CPU runtime. The service runs as a real process, since transformers
warns once per process."""

import time

import pytest

from duo.client.child_service import ChildService, wait_all_serving
from tests.conftest import KERNELS
from tests.tiny_models import save_pair


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_the_verify_service_starts_without_warnings(tmp_path, arch, kernels):
    pair = save_pair(tmp_path, arch)
    verify = ChildService.start("verify", ["duo.verify_service.cli", "serve", "--model", str(pair.target_dir),
                                           "--device", "cpu", "--threads", "1", "--cpu-kernels", kernels], tmp_path)
    try:
        # the model is loaded and its tree-attention self-check has run
        wait_all_serving((verify,), time.monotonic() + 120)
    finally:
        verify.stop()
    log = (tmp_path / "verify.log").read_text()
    assert "serving" in log
    assert "deprecated" not in log.lower() and "warning" not in log.lower(), log
    assert "[transformers]" not in log, log  # transformers' own warnings, printed beside the logging module
