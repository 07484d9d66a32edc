import logging

import pytest

from tests.inprocess import running_pair
from tests.tiny_models import save_pair

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_pair(request, tmp_path_factory):
    """A tiny target/draft pair of one architecture, saved to disk."""
    return save_pair(tmp_path_factory.mktemp(f"pair-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_services(tiny_pair):
    """Both services running in-process on the tiny pair."""
    with running_pair(tiny_pair.target_dir, tiny_pair.draft_dir) as pair:
        yield pair
