"""One-pass tree verification: the tree forward (4D mask + depth positions) gives the logits of running each
root-to-node path on its own; a model that cannot take the mask is detected and gets chains only."""

import pytest
import torch

from duo.common.errors import InvalidArgument
from duo.common.models import LoadedModel, ModelInfo
from duo.common.params import DecodingParams
from duo.common.tree import TokenTree
from duo.common.tree_attention import sequential_logits, supports_tree_attention, tree_logits
from tests.tiny_models import VOCAB_SIZE, build_model
from duo.verify_service.engine import TargetVerifier

#  root ─ 4 ─ 6 ─ 9
#       │   └ 7
#       └ 5 ─ 8
TREE = TokenTree((4, 5, 6, 7, 8, 9), (-1, -1, 0, 0, 1, 2))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tree_forward_equals_each_path_run_alone(arch):
    model = build_model(arch)
    prefix = [1, 5, 9, 20, 7]
    tree_out = tree_logits(model, prefix, TREE)
    reference = sequential_logits(model, prefix, TREE)
    relative = (tree_out - reference).abs().max() / reference.abs().max()
    assert relative < 1e-5, float(relative)
    assert supports_tree_attention(model)


class IgnoresCustomMasks(torch.nn.Module):
    """A model whose attention code drops the custom mask and positions (as some architectures would)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    @property
    def dtype(self):
        return self.inner.dtype

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(**kwargs)


def info():
    return ModelInfo("tiny", VOCAB_SIZE, "x", (2,), 256, "cpu", "float32")


def test_a_model_that_ignores_the_mask_is_detected_and_refuses_trees():
    model = IgnoresCustomMasks(build_model("llama"))
    assert not supports_tree_attention(model)
    verifier = TargetVerifier(LoadedModel(model, None, info()))
    assert verifier.info.tree_attention is False
    session = verifier.open((1, 5, 9), DecodingParams()).session
    with pytest.raises(InvalidArgument, match="tree attention"):
        verifier.verify(session, TREE)
    assert len(verifier.verify(session, TokenTree.chain([4, 6])).acceptance.accepted_nodes) <= 2  # chains work


def test_tree_verification_keeps_only_the_accepted_paths_cache():
    """After a tree round, the next round's logits equal a fresh computation over the committed tokens."""
    model = build_model("llama")
    verifier = TargetVerifier(LoadedModel(model, None, info()))
    assert verifier.info.tree_attention
    prompt = (1, 5, 9, 20)
    prefill = verifier.open(prompt, DecodingParams())
    committed = [*prompt, prefill.first_token]
    with torch.inference_mode():
        wanted = model(input_ids=torch.tensor([committed])).logits[0, -1].argmax()
        after = model(input_ids=torch.tensor([[*committed, int(wanted)]])).logits[0, -1].argmax()
    # the target's own token as the second child of the root, with a child of its own
    tree = TokenTree((int((wanted + 1) % VOCAB_SIZE), int(wanted), int(after), 3), (-1, -1, 1, 0))
    outcome = verifier.verify(prefill.session, tree)
    assert outcome.acceptance.accepted_nodes[:2] == (1, 2)
    committed += [int(wanted), int(after), outcome.acceptance.next_token]
    round_two = verifier.verify(prefill.session, TokenTree.empty())
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([committed])).logits[0, -1].argmax()
    assert round_two.acceptance.next_token == int(expected)
