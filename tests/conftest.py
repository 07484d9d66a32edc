import logging

import pytest

from duo.common.packed_linear import kernel_unavailable_reason
from tests.inprocess import running_pair
from tests.tiny_models import save_pair

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_pair(request, tmp_path_factory):
    """A tiny target/draft pair of one architecture, saved to disk."""
    return save_pair(tmp_path_factory.mktemp(f"pair-{request.param}"), request.param)


KERNELS = ["packed", "torch"] if kernel_unavailable_reason() is None else ["torch"]


@pytest.fixture(scope="session", params=KERNELS)
def tiny_services(tiny_pair, request):
    """Both services running in-process on the tiny pair, with each CPU runtime that can run here."""
    with running_pair(tiny_pair.target_dir, tiny_pair.draft_dir, cpu_kernels=request.param) as pair:
        yield pair
