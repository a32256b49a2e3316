"""Quality rules over windows: real prose passes, junk fails, repetition is judged locally."""

from __future__ import annotations

from simone.data.dedup import WordHasher
from simone.data.quality import DocTokens, assess
from tests.curate_helpers import prose


def _assess(text: str, relax: float = 0.0, window: int = 2000):
    h = WordHasher()
    return assess(text, DocTokens.of(text, h), window, h, relax)


def test_prose_passes_every_rule_and_reports_every_value():
    values, failed = _assess(prose(1, 6000))
    assert failed == []
    assert values["windows"] == 3
    assert 3.0 < values["mean_word_length"] < 10.0 and values["stop_words"] >= 4


def test_one_repetitive_section_does_not_reject_a_long_book():
    litany = "\n".join(["Lord, have mercy upon us, and hear our prayer this day."] * 200)  # ~2200 words
    book = prose(2, 4000) + "\n\n" + litany + "\n\n" + prose(3, 4000)
    values, failed = _assess(book)
    assert failed == [] and values["dup_5gram_frac_failed_windows"] >= 1
    _, failed_alone = _assess(litany)
    assert "dup_5gram_frac" in failed_alone and "dup_line_frac" in failed_alone


def test_symbol_and_number_tables_fail():
    table = "\n".join(f"{i} | {i * 3} | {i * 7} ... # {i * 11}" for i in range(600))
    _, failed = _assess(table)
    assert {"symbol_word_ratio", "alpha_word_frac", "stop_words"} <= set(failed)


def test_domain_relaxation_widens_thresholds():
    words = prose(4, 3000).split(" ")
    for i in range(0, len(words), 8):  # ~0.125 symbols per word: over 0.1, under 0.1 * 1.5
        words[i] = words[i] + " #"
    text = " ".join(words)
    assert "symbol_word_ratio" in _assess(text)[1]
    assert "symbol_word_ratio" not in _assess(text, relax=0.5)[1]


def test_whitespace_share_is_over_the_whole_text_and_fails_above_half():
    from simone.data.quality import WHITESPACE, passes, whitespace_share

    text = prose(5, 500)
    assert 0.1 < whitespace_share(text) < 0.3 and passes(WHITESPACE, whitespace_share(text), relax=0.0)
    padded = text + " " * (3 * len(text)) + "end"  # one run, in one window: still most of the text
    assert whitespace_share(padded) > 0.75 and not passes(WHITESPACE, whitespace_share(padded), relax=0.0)
    assert passes(WHITESPACE, 0.7, relax=0.5) and whitespace_share("") == 0.0
