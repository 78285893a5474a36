"""VALL-E X's text front end as this project's code, against the original's ids.

tests/fixtures/vallex/english_ids.json holds what Plachtaa/VALL-E-X@3faaf8c's own cleaners and
bpe_69 table give for the 50 sentences of english_sentences.txt (scripts/make_vallex_fixtures.py
--parts text).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vall_e.utils.errors import UserError
from vall_e.text import vallex

FIXTURES = Path(__file__).parent / "fixtures" / "vallex"

pytest.importorskip("eng_to_ipa")


def test_fifty_english_sentences_give_the_original_ids():
    data = json.loads((FIXTURES / "english_ids.json").read_text(encoding="utf-8"))
    rows = data["sentences"]
    assert len(rows) == 50
    wrong = []
    for row in rows:
        ids, langs = vallex.token_ids(f"[EN]{row['text']}[EN]")
        if ids != row["ids"] or "".join(lang[0] for lang in langs) != row["langs"]:
            wrong.append(row["text"])
    assert not wrong, f"{len(wrong)} sentences differ, e.g. {wrong[0]!r}"


def test_folded_ids_carry_the_language():
    f = vallex.VallexFrontend()
    plain, _ = vallex.token_ids("[EN]Hello.[EN]")
    assert f.encode("Hello.", "en") == plain  # English is language 0
    assert f.encode("Hello.", "en", force_language="ja") == [2 * 2048 + i for i in plain]
    assert f.encode("[EN]Hello.[EN]", "zh") == plain  # tags win over the language argument


def test_table_is_bpe_69():
    assert len(vallex.TABLE) == 70 and vallex.TABLE["_"] == 16 and vallex.TABLE["↓"] == 69


def test_bad_language_is_one_line_error():
    with pytest.raises(UserError, match="en, zh and ja"):
        vallex.VallexFrontend().encode("Bonjour.", "fr")


def test_chinese_and_mixed_sentences_give_the_original_ids():
    """Needs the vallex-zh extra; the fixture records the jieba/pypinyin/cn2an versions it was made with."""
    for name in ("jieba", "pypinyin", "cn2an"):
        pytest.importorskip(name)
    data = json.loads((FIXTURES / "chinese_ids.json").read_text(encoding="utf-8"))
    wrong = []
    for row in data["sentences"]:
        ids, langs = vallex.token_ids(row["text"])
        if ids != row["ids"] or "".join(lang[0] for lang in langs) != row["langs"]:
            wrong.append(row["text"])
    assert not wrong, f"{len(wrong)} of {len(data['sentences'])} differ (made with {data['versions']}), e.g. {wrong[0]!r}"


def test_japanese_is_a_clear_error():
    with pytest.raises(UserError, match="Japanese"):
        vallex.VallexFrontend().encode("[JA]こんにちは[JA]")


def test_amphion_front_end_gives_their_ids():
    """Amphion@d3de90f's own G2PModule + TextTokenCollator (same espeak wheel) on the 50 sentences."""
    from vall_e.text.amphion import AmphionFrontend

    data = json.loads((FIXTURES / "amphion_ids.json").read_text(encoding="utf-8"))
    front = AmphionFrontend({"symbols": data["symbols"]})
    wrong = [row["text"] for row in data["sentences"] if front.encode(row["text"]) != row["ids"]]
    assert not wrong, f"{len(wrong)} sentences differ, e.g. {wrong[0]!r}"
    # a reference transcript is phonemized together with the text, as Amphion's inference does
    joined = front.encode_with_reference("over the lazy dog!", "en", "The quick brown fox jumps")
    assert joined == front.encode("The quick brown fox jumps over the lazy dog!")


def test_sentence_splitting_keeps_tagged_text_readable():
    from vall_e.generation.tts import split_sentences

    pieces = split_sentences("[EN]Good morning. How are you today?[EN]")
    assert len(pieces) == 2
    got = [vallex.token_ids(vallex.tag(p, "zh"))[0] for p in pieces]
    assert got == [vallex.token_ids("[EN]Good morning.[EN]")[0], vallex.token_ids("[EN]How are you today?[EN]")[0]]
