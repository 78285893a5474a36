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


def _differing(rows: list[dict], tag: str) -> list[str]:
    """The texts whose ids or per-token languages differ from the fixture's (`tag` wraps each text)."""
    wrong = []
    for row in rows:
        ids, langs = vallex.token_ids(f"{tag}{row['text']}{tag}")
        if ids != row["ids"] or "".join(lang[0] for lang in langs) != row["langs"]:
            wrong.append(row["text"])
    return wrong


def test_fifty_english_sentences_give_the_original_ids():
    data = json.loads((FIXTURES / "english_ids.json").read_text(encoding="utf-8"))
    rows = data["sentences"]
    assert len(rows) == 50
    wrong = _differing(rows, "[EN]")
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
    wrong = _differing(data["sentences"], "")
    assert not wrong, f"{len(wrong)} of {len(data['sentences'])} differ (made with {data['versions']}), e.g. {wrong[0]!r}"


def _japanese_reference() -> tuple[list[dict], str]:
    """What their cleaners + table give for japanese_sentences.txt: run live from a checkout of
    Plachtaa/VALL-E-X@3faaf8c named by VALLEX_UPSTREAM, else the fixture, when it was made with the
    pyopenjtalk-plus installed here (its dictionary shapes the result)."""
    import importlib.metadata as md
    import importlib.util
    import os

    upstream = os.environ.get("VALLEX_UPSTREAM")
    if upstream and (Path(upstream) / "utils" / "g2p" / "japanese.py").is_file():
        pytest.importorskip("tokenizers")
        script = Path(__file__).resolve().parents[1] / "scripts" / "make_vallex_fixtures.py"
        spec = importlib.util.spec_from_file_location("make_vallex_fixtures", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sentences = (FIXTURES / "japanese_sentences.txt").read_text(encoding="utf-8").splitlines()
        return module.japanese_reference_ids(Path(upstream).resolve(), sentences), f"their code at {upstream}"
    data = json.loads((FIXTURES / "japanese_ids.json").read_text(encoding="utf-8"))
    made_with, here = data["versions"]["pyopenjtalk-plus"], md.version("pyopenjtalk-plus")
    if made_with != here:
        pytest.skip(f"japanese_ids.json was made with pyopenjtalk-plus {made_with}, {here} is installed: "
                    "set VALLEX_UPSTREAM to a checkout of Plachtaa/VALL-E-X@3faaf8c to compare live")
    return data["sentences"], f"japanese_ids.json (pyopenjtalk-plus {made_with})"


def test_japanese_sentences_give_the_original_ids():
    """Needs the vallex-ja extra (pyopenjtalk-plus)."""
    pytest.importorskip("pyopenjtalk")
    rows, source = _japanese_reference()
    assert len(rows) >= 40
    wrong = _differing(rows, "[JA]")
    assert not wrong, f"{len(wrong)} of {len(rows)} differ from {source}, e.g. {wrong[0]!r}"


def test_japanese_is_detected_and_mixes_with_english():
    pytest.importorskip("pyopenjtalk")
    f = vallex.VallexFrontend()
    ja, _ = vallex.token_ids("[JA]今日はいい天気ですね。[JA]")
    assert f.encode("今日はいい天気ですね。", "auto") == [2 * 2048 + i for i in ja]  # langid says ja
    assert f.encode("今日はいい天気ですね。", "ja") == f.encode("[JA]今日はいい天気ですね。[JA]", "en")
    en, _ = vallex.token_ids("[EN]Hello.[EN]")
    mixed = f.encode("[EN]Hello.[EN][JA]今日はいい天気ですね。[JA]")
    assert mixed == en + [2 * 2048 + i for i in ja]


def test_missing_japanese_extra_is_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vall_e.text.vallex_ja", None)  # import fails as without the extra
    with pytest.raises(UserError, match=r"vall-e\[vallex-ja\]"):
        vallex.VallexFrontend().encode("[JA]こんにちは[JA]")


def test_japanese_text_splits_into_sentences_without_spaces():
    from vall_e.generation.tts import split_sentences

    text = "[JA]今日は晴れ。明日は雨でしょう！本当？「はい。」と言った。[JA]"
    pieces = split_sentences(text)
    assert pieces == ["[JA]今日は晴れ。[JA]", "[JA]明日は雨でしょう！[JA]", "[JA]本当？[JA]", "[JA]「はい。」と言った。[JA]"]
    assert split_sentences("[EN]One. Two. Three.[EN]") == ["[EN]One.[EN]", "[EN]Two.[EN]", "[EN]Three.[EN]"]
    assert split_sentences("[ZH]你好。[ZH][EN]Hi there.[EN]") == ["[ZH]你好。[ZH][EN]Hi there.[EN]"]


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
