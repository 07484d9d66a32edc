"""The tree-attention self-check's verdict is kept in duo's cache and read back when the same model loads again
with the same code, instead of running the check; anything it depends on that changes (the model's files, its
code) means a new check; a model in the temporary directory is checked every time and leaves nothing behind."""

import os
import tempfile

import pytest
from transformers import AutoModelForCausalLM

from duo.common import tree_attention
from duo.common.tree_attention import supports_tree_attention
from tests.test_tree_attention import IgnoresCustomMasks
from tests.tiny_models import save_pair


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "self-checks"


@pytest.fixture
def kept_folder(tmp_path, monkeypatch):
    """A model folder outside the temporary directory (which the test moves elsewhere)."""
    elsewhere = tmp_path / "temporary"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    return save_pair(tmp_path / "models", "llama").target_dir


@pytest.fixture
def checks(monkeypatch):
    """The verdicts of the self-checks that really ran."""
    ran = []
    check = tree_attention._tree_attention_matches

    def counted(model):
        ran.append(check(model))
        return ran[-1]

    monkeypatch.setattr(tree_attention, "_tree_attention_matches", counted)
    return ran


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_a_verdict_is_kept_and_read_back_instead_of_checking_again(cache, kept_folder, checks):
    assert supports_tree_attention(load(kept_folder))
    assert supports_tree_attention(load(kept_folder))
    assert checks == [True]
    assert len(list(cache.iterdir())) == 1


def test_changed_files_or_code_mean_a_new_check(cache, kept_folder, checks):
    assert supports_tree_attention(load(kept_folder))
    weights = next(kept_folder.glob("*.safetensors"))
    later = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(later, later))
    assert supports_tree_attention(load(kept_folder))
    # another forward pass over the same files: one that drops the mask gets a verdict of its own
    assert not supports_tree_attention(IgnoresCustomMasks(load(kept_folder)))
    assert not supports_tree_attention(IgnoresCustomMasks(load(kept_folder)))
    assert checks == [True, True, False]


def test_a_model_in_the_temporary_directory_is_checked_every_time(cache, tmp_path, checks):
    folder = save_pair(tmp_path, "llama").target_dir  # pytest's tmp_path lies in the temporary directory
    assert supports_tree_attention(load(folder))
    assert supports_tree_attention(load(folder))
    assert checks == [True, True]
    assert not cache.exists()
