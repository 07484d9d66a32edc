"""StopChecker: exact ends, and streamed text that never has to be taken back."""

from duo.common.params import StoppingParams
from duo.common.stopping import FinishReason, StopChecker

WORDS = {1: "Hello", 2: ",", 3: " wor", 4: "ld", 5: "!", 6: " END", 7: "\ufffd"}
EOS = 9


def decode(ids):
    return "".join(WORDS.get(i, "") for i in ids)


def checker(**params):
    return StopChecker(StoppingParams(**params), frozenset({EOS}), decode)


def test_eos_is_kept_and_nothing_after_it():
    stop = checker(max_new_tokens=10)
    result = stop.add([1, EOS, 2, 3])
    assert result.token_ids == (1, EOS)
    assert result.finish_reason == FinishReason.EOS
    assert stop.add([4]).token_ids == ()


def test_ignore_eos_keeps_going():
    stop = checker(max_new_tokens=10, ignore_eos=True)
    assert stop.add([1, EOS, 2]).finish_reason is None


def test_max_new_tokens_cuts_inside_a_round():
    stop = checker(max_new_tokens=3)
    assert stop.add([1, 2]).finish_reason is None
    assert stop.remaining == 1
    result = stop.add([3, 4, 5])
    assert result.token_ids == (3,)
    assert result.finish_reason == FinishReason.LENGTH
    assert stop.remaining == 0


def test_stop_string_across_tokens_cuts_text_and_tokens():
    stop = checker(max_new_tokens=10, stop_strings=("world",))
    first = stop.add([1, 2, 3])
    assert first.finish_reason is None
    result = stop.add([4, 5, 6])
    assert result.token_ids == (4,)  # "ld" completes "world"; "!" and " END" are never emitted
    assert result.finish_reason == FinishReason.STOP
    assert stop.text == "Hello, "
    assert first.text_delta + result.text_delta == "Hello, "
    assert stop.token_ids == [1, 2]  # the generation's tokens are those of its text: " wor" and "ld" are the stop's


def test_a_stop_string_starting_inside_a_token_drops_that_token_too():
    stop = checker(max_new_tokens=10, stop_strings=("orld",))
    stop.add([1, 2, 3, 4])
    assert stop.text == "Hello, w"
    assert stop.token_ids == [1, 2]  # decode: "Hello,", the part of the text its tokens make up


def test_text_that_could_become_a_stop_string_is_held_back():
    stop = checker(max_new_tokens=10, stop_strings=("wxyz",))
    # The last len("wxyz") - 1 = 3 characters wait until more text shows they cannot start a stop string.
    assert stop.add([1]).text_delta == "He"
    assert stop.add([2, 3]).text_delta == "llo, "
    end = stop.add([4, 5, 6, EOS])
    assert end.finish_reason == FinishReason.EOS
    assert "".join(["He", "llo, ", end.text_delta]) == "Hello, world! END"


def test_incomplete_utf8_is_held_back_until_complete():
    # Byte-level tokenizers: token 7 is the first byte of "é" (decoded alone: U+FFFD), token 8 the second.
    WORDS_WITH_BYTE = {**WORDS, 8: "#"}
    stop = StopChecker(StoppingParams(max_new_tokens=10), frozenset({EOS}),
                       lambda ids: "".join(WORDS_WITH_BYTE.get(i, "") for i in ids).replace("\ufffd#", "é"))
    assert stop.add([1, 7]).text_delta == "Hello"
    assert stop.add([8]).text_delta == "é"
    assert stop.end(FinishReason.LENGTH) == ""
    assert stop.text == "Helloé"


def test_earliest_of_several_stop_strings_wins():
    stop = checker(max_new_tokens=10, stop_strings=("!", "wor"))
    result = stop.add([1, 2, 3, 4, 5])
    assert result.token_ids == (1, 2, 3)
    assert stop.text == "Hello, "
    assert stop.token_ids == [1, 2]
