"""The protobuf codec (``duo.common.codec``): what one service sends, the other reads back unchanged."""

from duo.common import codec
from duo.common.models import ModelInfo


def test_model_info_crosses_the_wire_field_for_field():
    info = ModelInfo(model_name="target", vocab_size=100, tokenizer_fingerprint="abc", eos_token_ids=(2, 7),
                     max_context_tokens=256, device="cuda:0", dtype="bfloat16", max_tree_nodes=64, tree_attention=True)
    assert codec.model_info_from_pb(codec.model_info_to_pb(info)) == info
