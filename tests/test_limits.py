"""Token ids and prompt lengths against a model's limits: exact at the edges, the same wording wherever a
request is refused (``duo.common.limits``)."""

import pytest

from duo.common.errors import InvalidArgument
from duo.common.limits import check_prompt_fits, checked_token_ids


def test_ids_inside_the_vocabulary_pass_as_a_tuple_of_ints():
    assert checked_token_ids([0, 7, 9], vocab_size=10, what="prompt") == (0, 7, 9)


@pytest.mark.parametrize("ids", [[10], [-1], [3, 10, 11, 12, 13, 14, 15]])
def test_ids_outside_the_vocabulary_are_named(ids):
    with pytest.raises(InvalidArgument, match=r"continuation: token ids \[.*\] are outside the vocabulary \[0, 10\)"):
        checked_token_ids(ids, vocab_size=10, what="continuation")


def test_a_prompt_fits_while_it_leaves_one_position_for_a_new_token():
    check_prompt_fits(15, max_context_tokens=16)
    with pytest.raises(InvalidArgument, match="the prompt has 16 tokens; the target's context holds 16"):
        check_prompt_fits(16, max_context_tokens=16)
