"""What ``infer`` prints: the default prompts, the text, the statistics line, the note."""

import pytest

from tinyskip.decode.run import opening_length, regime_note, shown_text, stats_line
from tinyskip.model.transformer import Transformer

PARAGRAPH = "Robert Boulter is an English film , television and theatre actor . He had".split()


@pytest.mark.parametrize("words,kept", [
    (12, 10),      # "... theatre actor ." ends the sentence: back off before "actor ."
    (11, 10),      # "... actor" is followed by "." : the same
    (7, 5),        # "... film ," ends on a mark, and "film" comes just before it
    (4, 4),        # "Robert Boulter is an" goes on with a word
])
def test_an_opening_never_ends_a_sentence(words, kept):
    n = opening_length(PARAGRAPH, words)
    assert n == kept
    assert PARAGRAPH[n - 1].isalnum() and PARAGRAPH[n].isalnum()


def _result(text, ended, new_tokens=4, compile_s=0.0, compiled=False):
    stats = {"new_tokens": new_tokens, "tokens_per_s": 123.4, "compile_s": compile_s,
             "prompt_tokens": 3, "prefill_s": 0.002, "layers_per_token": 4.0,
             "heads_per_token": 1.0}
    return {"prompt": "The game was", "text": text, "ended": ended, "stats": stats,
            "compiled": compiled}


def test_the_text_marks_the_prompt_the_end_and_a_cut():
    assert shown_text(_result(" released in 1994 .\n", True)) == \
        "The game was -> released in 1994 . <end>"
    # Cut by the length limit: "Ameri" may be half a word, so it is not shown.
    assert shown_text(_result(" released in North Ameri", False)) == \
        "The game was -> released in North [...]"


def test_the_statistics_line_never_times_an_empty_generation_or_a_compile():
    line = stats_line(_result("\n", True, new_tokens=1))
    assert "ended the text at once" in line and "tok/s" not in line
    line = stats_line(_result(" a b c d", False, compile_s=12.5, compiled=True))
    assert "123.4 tok/s, compiled steps (compiling the decoding steps took 12.5 s, not " \
           "counted)" in line
    assert "eager steps" in stats_line(_result(" a b c d", False))


def test_the_regime_note_is_for_early_exit_on_cache_sized_models(tiny_config):
    model = Transformer(tiny_config())
    assert "fit in a CPU cache" in regime_note(model, "ssd")
    assert "mode=dee is usually slower" in regime_note(model, "dee")
    assert regime_note(model, "full") is None
    big = Transformer(tiny_config(vocab_size=300_000, hidden_size=32))   # 36.6 MiB of weights
    assert regime_note(big, "ssd") is None
