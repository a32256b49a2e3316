"""Cleaning one text: decoding, header block, Gutenberg boilerplate in every marker variant."""

from __future__ import annotations

import codecs

import pytest

from simone.data.clean import DecodeProblem, clean_text, decode_bytes, is_stub
from simone.data.labels import check_label
from tests.curate_helpers import book

BOOK = book("The Salt Road", "Wren Ashby", 11, 1200).strip().replace("\n\n\n", "\n\n")
LICENSE = ("Project Gutenberg-tm is synonymous with the free distribution of electronic works.\n"
           "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works.\n") * 15

VARIANTS = {
    "modern THE": (
        "The Project Gutenberg eBook of The Salt Road, by Wren Ashby\n\nThis eBook is for the use of anyone anywhere.\n\n"
        "Title: The Salt Road\nAuthor: Wren Ashby\nRelease Date: May 1, 2004 [eBook #12]\nLanguage: English\n\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK THE SALT ROAD ***\n\n\n",
        "\n\n\n*** END OF THE PROJECT GUTENBERG EBOOK THE SALT ROAD ***\n\n" + LICENSE),
    "older THIS": (
        "The Project Gutenberg EBook of The Salt Road, by Wren Ashby\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK THE SALT ROAD ***\n\nProduced by Jane Volunteer and the Online\nDistributed Proofreading Team\n\n\n",
        "\n\nEnd of the Project Gutenberg EBook of The Salt Road, by Wren Ashby\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK THE SALT ROAD ***\n\n" + LICENSE),
    "no spaces": (
        "***START OF THE PROJECT GUTENBERG EBOOK THE SALT ROAD***\n\n",
        "\n\n***END OF THE PROJECT GUTENBERG EBOOK THE SALT ROAD***\n" + LICENSE),
    "1990s small print": (
        "The Project Gutenberg Etext of The Salt Road\n\n"
        "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n\n"
        "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\n" + LICENSE
        + "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n\n",
        "\n\nEnd of The Project Gutenberg Etext of The Salt Road\n"),
    "Project Gutenberg's, licence only": (
        "Project Gutenberg's The Salt Road, by Wren Ashby\n\nThis eBook is for the use of anyone anywhere at no cost.\n\n"
        "Title: The Salt Road\n\nAuthor: Wren Ashby\n\nRelease Date: June 2, 2008\n\nLanguage: English\n\n"
        "Character set encoding: ASCII\n\n",
        "\n\nEnd of Project Gutenberg's The Salt Road, by Wren Ashby\n\n*** START: FULL LICENSE ***\n" + LICENSE),
    "wrapped marker": (
        "*** START OF THE PROJECT GUTENBERG EBOOK THE SALT ROAD, A TALE OF THE\nOLD COUNTRY ***\n\n"
        "Transcriber's Note: obvious typographical errors have been corrected.\n\n",
        "\n\n*** END OF THE PROJECT GUTENBERG EBOOK THE SALT ROAD, A TALE OF THE\nOLD COUNTRY ***\n" + LICENSE),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gutenberg_boilerplate_is_stripped_and_the_book_kept_intact(variant):
    head, tail = VARIANTS[variant]
    cleaned = clean_text((head + BOOK + tail).replace("\n", "\r\n"))
    assert cleaned.text == BOOK
    assert "boilerplate_stripped" in cleaned.reasons
    assert check_label("The Salt Road", "Wren Ashby", cleaned.text, cleaned.named_titles) is None


def test_gutenberg_line_naming_another_title_is_a_mismatch():
    text = "*** START OF THE PROJECT GUTENBERG EBOOK THE SALT ROAD ***\n\n" + BOOK + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK THE SALT ROAD ***\n"
    cleaned = clean_text(text)
    assert check_label("Meditations on Virtue", "Wren Ashby", cleaned.text, cleaned.named_titles)
    # a differently punctuated/cased title and a subtitle still match
    assert check_label("Salt Road", "W. Ashby", cleaned.text, cleaned.named_titles) is None
    assert check_label("The Salt-Road: A Tale", None, cleaned.text, cleaned.named_titles) is None


def test_title_and_author_missing_from_the_start_is_a_mismatch():
    assert check_label("Meditations on Virtue", "Marcus Quell", BOOK, [])
    assert check_label("Meditations on Virtue", "Wren Ashby", BOOK, []) is None  # author found


def test_header_block_is_metadata_and_line_endings_and_blank_runs_are_normalised():
    text = "Title: The Salt Road\r\nAuthor: Wren Ashby\r\nQuality Score: 9.50\r\n" + "=" * 60 + "\r\n\r\n" + BOOK.replace("\n\n", "\n\n\n\n\r\r")
    cleaned = clean_text(text)
    assert cleaned.header == {"title": "The Salt Road", "author": "Wren Ashby", "quality_score": 9.5}
    assert "header_stripped" in cleaned.reasons
    assert cleaned.text == BOOK


def test_text_without_header_is_left_whole():
    text = "Note: this is not a header block\nbecause prose follows before any rule.\n" + BOOK
    assert clean_text(text).header is None


def test_decoding_boms_and_failures():
    assert decode_bytes(codecs.BOM_UTF16_BE + "Hello, world.".encode("utf-16-be")) == ("Hello, world.", "utf-16-be with BOM")
    assert decode_bytes(codecs.BOM_UTF8 + b"Hello") == ("Hello", "utf-8 with BOM")
    assert decode_bytes("plain ascii and caf\u00e9".encode()) == ("plain ascii and caf\u00e9", None)
    with pytest.raises(DecodeProblem) as e:
        decode_bytes(b"Hello world " * 10 + b"\xff\xfe more")
    assert e.value.code == "not_utf8" and "byte 120" in e.value.message
    with pytest.raises(DecodeProblem) as e:
        decode_bytes(b"\x00" * 100)
    assert e.value.code == "binary"


def test_stub_detection():
    assert is_stub("FAKE TEXT for 'Vol 1' by X. Replace with real content.", 9)
    assert is_stub(BOOK, len(BOOK.split())) is None


def test_label_matching_ignores_plurals_spelling_and_subtitles():
    text = "The Tragedie of Julius Caesar\n\nActus Primus. Enter Flauius and certaine Commoners.\n"
    assert check_label("Julius Caesar", "William Shakespeare", text, []) is None
    assert check_label("Two Treatises of Government", "John Locke", "SECOND TREATISE\n\nby JOHN LOCKE", ["SECOND TREATISE OF GOVERNMENT"]) is None
    assert check_label("Washington Irving Tales", "Washington Irving", "SLEEPY HOLLOW\n\nby W. IRVING", ["THE LEGEND OF SLEEPY HOLLOW"]) is None
    assert check_label("Joel (King James Version)", "King James Version translators (1611)", "Joel\n\nThe word of the LORD", []) is None


def test_short_work_before_a_long_licence_is_cut_at_its_end_marker():
    short = "THE SHORT COMPACT\n\nIn the name of God, we whose names are underwritten do combine ourselves together."
    cleaned = clean_text(short + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK THE SHORT COMPACT ***\n\n"
                         "Updated editions will replace the previous one.\n" + LICENSE * 3)
    assert cleaned.text == short


def test_end_marker_inside_an_anthology_without_licence_is_left_alone():
    first, second = book("First Tale", "Ann Bee", 1, 300), book("Second Tale", "Ann Bee", 2, 2000)
    text = first + "\nEnd of the Project Gutenberg EBook of First Tale\n\n" + second
    assert "SECOND TALE" in clean_text(text).text


def test_author_match_is_by_surname_not_first_name():
    text = "OLIVER TWIST\n\nby Charles Dickens\n\nAmong other public buildings in a certain town."
    assert check_label("The Blessings of Brokenness", "Charles Stanley", text, [])
    assert check_label("Great Expectations", "Charles Dickens", text, []) is None  # same author
    assert check_label("Discourse on Inequality", "Jean-Jacques Rousseau", "A DISCOURSE\n\nBy J. J. Rousseau", []) is None


def test_long_runs_of_spaces_and_marker_lines_clean_in_linear_time():
    import time

    from simone.data.clean import collapse_blank_lines

    assert collapse_blank_lines("a  \t\nb \n \n\t\n\nc  ") == "a\nb\n\nc"
    cases = {
        "spaces, no newline": "word " + " " * 2_000_000 + "end",  # `[ \t]+\n` retried from every space
        "end-marker lines": "End of the Project Gutenberg work\n" * 30_000,  # a licence search after each
    }
    for name, text in cases.items():
        t0 = time.perf_counter()
        clean_text(text)
        assert time.perf_counter() - t0 < 5.0, name
