"""Text front end: G2P token rules, languages, the symbol map and the .phn.txt format."""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vall_e.text import (
    LanguageMap,
    Symmap,
    format_phonemes,
    normalize_language,
    parse_phonemes,
    phonemize,
    phonemize_many,
    read_phonemes,
    tokenize,
)
from vall_e.text.phonemes import stress_of
from vall_e.text.symmap import BOS_ID, BOUNDARY_ID, EOS_ID, PAD_ID
from vall_e.utils.errors import UserError

B = " "


def _is_phone(tok: str) -> bool:
    return tok != B and not all(c in ';:,.!?¡¿—…"«»“”(){}[]' for c in tok)


# --------------------------------------------------------------------------- g2p


def test_phonemize_english():
    # separate stress (the default): a stress mark is a token where espeak puts it, before the vowel
    assert phonemize("Hello world, how are you?") == [
        "h", "ə", "l", "ˈ", "o", "ʊ", B, "w", "ˈ", "ɜː", "l", "d", ",", B, "h", "ˈ", "a", "ʊ", B, "ɑː", "ɹ", B,
        "j", "uː", "?",
    ]
    # merged stress (the reference's rule, and every model made before the modes): onto the phone before
    assert phonemize("Hello world, how are you?", stress="merged") == [
        "h", "ə", "lˈ", "o", "ʊ", B, "wˈ", "ɜː", "l", "d", ",", B, "hˈ", "a", "ʊ", B, "ɑː", "ɹ", B, "j", "uː", "?",
    ]


def test_phonemize_german_and_french():
    assert phonemize("Guten Tag", "de") == ["ɡ", "ˈ", "uː", "t", "ə", "n", B, "t", "ˈ", "ɑː", "k"]
    assert phonemize("Guten Tag", "de", stress="merged") == ["ɡˈ", "uː", "t", "ə", "n", B, "tˈ", "ɑː", "k"]
    fr = phonemize("Un bon vin blanc.", "fr")
    assert "ɔ̃" in fr and "ɑ̃" in fr  # combining tilde stays on its vowel
    assert not any(t.startswith("\u0303") for t in fr)


def test_word_boundary_is_exactly_one_token():
    tokens = phonemize("  one   two\tthree\n\nfour  ")
    assert "" not in tokens
    assert tokens.count(B) == 3
    assert tokens[0] != B and tokens[-1] != B
    assert all(not (a == B and b == B) for a, b in zip(tokens, tokens[1:]))


def test_punctuation_is_its_own_token():
    tokens = phonemize("Yes, really! (ok)")
    for p in ",!()":
        assert p in tokens
    i = tokens.index(",")
    assert tokens[i + 1] == B  # the boundary after the comma, once
    assert all(len(t) == 1 for t in tokens if not _is_phone(t))


def test_stress_marks_are_tokens_and_length_marks_stay_on_their_phone():
    text = "The quick brown fox jumps over the lazy dog. Beautiful weather again."
    tokens = phonemize(text)
    assert "ˈ" in tokens and "ˌ" in tokens and "ː" not in tokens
    assert not any(len(t) > 1 and ("ˈ" in t or "ˌ" in t) for t in tokens)  # never joined to a phone
    assert any(t.endswith("ː") and len(t) > 1 for t in tokens)  # iː, ɑː: length is part of the phone
    assert [t for t in tokens if t not in "ˈˌ"] == [t.replace("ˈ", "").replace("ˌ", "") for t in
                                                   phonemize(text, stress="merged") if t not in "ˈˌ"]
    merged = phonemize(text, stress="merged")
    assert not any(t in ("ˈ", "ˌ", "ː") for t in merged)
    assert any("ˈ" in t for t in merged) and any(t.endswith("ː") for t in merged)
    assert stress_of(tokens) == "separate" and stress_of(merged) == "merged"
    assert stress_of(["a", B, "b", ","]) is None  # no stress mark: fits either mode
    with pytest.raises(UserError, match="unknown stress mode 'both'"):
        phonemize("hello", stress="both")


def test_tokenize_rules():
    assert tokenize("ab  ˈcd", stress="merged") == ["a", "b", B, "ˈc", "d"]  # word-initial stress: the next phone
    assert tokenize("aˈb ː", stress="merged") == ["aˈ", "b", B, "ː"]
    assert tokenize("ab  ˈcd") == ["a", "b", B, "ˈ", "c", "d"]
    assert tokenize("həlˈoʊ") == ["h", "ə", "l", "ˈ", "o", "ʊ"]
    assert tokenize("aˈb ː") == ["a", "ˈ", "b", B, "ː"]
    assert tokenize("ˈiːˌɔ̃ː") == ["ˈ", "iː", "ˌ", "ɔ̃ː"]  # length and combining marks stay on the phone
    assert tokenize("ˈːa") == ["ˈ", "ːa"]  # a length mark with no phone before it waits for the next one
    for stress in ("separate", "merged"):
        assert tokenize("a, b", stress=stress) == ["a", ",", B, "b"]
        assert tokenize(" a ", stress=stress) == ["a"]
        assert tokenize("a|b", stress=stress) == ["a", B, "b"]


def test_missing_espeak_library_is_a_clear_error(monkeypatch):
    import ctypes.util
    import sys

    from vall_e.text import espeak

    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # the wheel is not installed
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)  # nor a system library
    espeak.library_path.cache_clear()
    try:
        with pytest.raises(UserError, match="espeakng-loader"):
            espeak.library_path()
        monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.1")
        espeak.library_path.cache_clear()
        assert espeak.library_path() == "libespeak-ng.so.1"  # falls back to the system library
    finally:
        espeak.library_path.cache_clear()


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_a_user_error(text):
    with pytest.raises(UserError, match="empty"):
        phonemize(text)


def test_unpronounceable_and_non_string_text():
    with pytest.raises(UserError, match=r"'\.\.\.'"):
        phonemize("...")
    with pytest.raises(UserError, match="string"):
        phonemize(42)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="list of texts"):
        phonemize_many("abc")  # type: ignore[arg-type]


def test_unknown_language():
    with pytest.raises(UserError, match=r"unsupported language 'xx' \(supported: .*en"):
        phonemize("hello", "xx")


def test_normalize_language():
    assert normalize_language("en") == "en-us"
    assert normalize_language("EN_gb") == "en-gb"
    assert normalize_language("zh") == "cmn"
    assert normalize_language("en-gb-x-rp") == "en-gb-x-rp"
    with pytest.raises(UserError):
        normalize_language("")


def test_phonemize_many_matches_single_and_returns_errors():
    texts = ["Good morning.", "Second sentence here!", "A third one?"]
    assert phonemize_many(texts) == [phonemize(t) for t in texts]
    out = phonemize_many(["hi", "", "yo"], on_error="return")
    assert isinstance(out[1], UserError) and out[0] == phonemize("hi") and out[2] == phonemize("yo")
    with pytest.raises(UserError, match="#1"):
        phonemize_many(["hi", "", "yo"])


def test_very_long_text_is_chunked_and_fast():
    text = "The quick brown fox jumps over the lazy dog. " * 2300  # about 100k characters
    t = time.perf_counter()
    tokens = phonemize(text)
    assert time.perf_counter() - t < 30
    assert tokens.count(B) >= 9 * 2300 - 1
    run_on = phonemize("a" * 3000)  # one 'word' longer than a chunk: cut, not hung
    assert run_on


def test_threads_share_backend_safely():
    texts = [f"Sentence number {i} is spoken." for i in range(8)]
    expected = [phonemize(t) for t in texts]
    results: dict[int, list[str]] = {}

    def work(i):
        results[i] = phonemize(texts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [results[i] for i in range(8)] == expected


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=40))
def test_front_end_returns_tokens_or_user_error(text):
    try:
        tokens = phonemize(text)
    except UserError:
        return
    assert tokens and tokens[0] != B and tokens[-1] != B
    assert "" not in tokens
    assert all(t == B or not any(c.isspace() for c in t) for t in tokens)
    assert any(_is_phone(t) for t in tokens)
    assert parse_phonemes(format_phonemes(tokens)) == tokens


# --------------------------------------------------------------------------- languages


def test_language_map():
    m = LanguageMap()
    assert m.to_dict() == {"en": 0} and m.id("EN") == 0
    assert m.add("ja") == 1 and m.add("ja") == 1 and len(m) == 2 and "ja" in m
    with pytest.raises(UserError, match=r"unknown language 'de' in speakers/x"):
        m.id("de", source="speakers/x")
    assert LanguageMap.from_json(m.to_json()) == m
    with pytest.raises(UserError, match="ids"):
        LanguageMap({"en": 0, "de": 0})
    with pytest.raises(UserError, match="JSON"):
        LanguageMap.from_json("{not json", source="x.json")


# --------------------------------------------------------------------------- symmap


def test_symmap_specials_and_build_is_deterministic():
    a = Symmap.build([["p", "?", "a"], ["b", " ", "a"]])
    b = Symmap.build([["b", "a"], ["?", "p"]])
    assert a == b
    assert (a["<pad>"], a["<s>"], a["</s>"], a[" "]) == (PAD_ID, BOS_ID, EOS_ID, BOUNDARY_ID) == (0, 1, 2, 3)
    assert a.symbols[4:] == sorted(["p", "?", "a", "b"])
    ids = [a[s] for s in a]
    assert len(set(ids)) == len(ids) == len(a)  # no two symbols share an id
    assert a["?"] != a["p"]


def test_symmap_encode_decode():
    m = Symmap.build([["h", "ə", " ", "lˈ"]])
    ids = m.encode(["h", "ə", " ", "lˈ"])
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and ids[3] == BOUNDARY_ID
    assert m.decode(ids) == ["h", "ə", " ", "lˈ"]
    assert m.encode(["h"], add_bos_eos=False) == [m["h"]]
    with pytest.raises(UserError, match=r"unknown phoneme 'ʒ' in data/a\.phn\.txt"):
        m.encode(["h", "ʒ"], source="data/a.phn.txt")
    with pytest.raises(UserError, match="outside"):
        m.decode([len(m)])


def test_symmap_extend_and_base_keep_ids():
    base = Symmap.build([["b", "a"]])
    grown = Symmap.build([["c", "a", "0"]], base=base)
    assert all(grown[s] == base[s] for s in base)
    assert grown.symbols[len(base):] == ["0", "c"]
    assert base.extend(["z", "a", "y"]) == ["y", "z"] and "z" in base


def test_symmap_json_and_file_round_trip(tmp_path):
    m = Symmap.build([["ɑː", "ʃ", "?", "p"]])
    assert Symmap.from_json(m.to_json()) == m
    path = tmp_path / "symmap.json"
    m.save(path)
    assert Symmap.load(path) == m
    assert [p.name for p in tmp_path.iterdir()] == ["symmap.json"]  # no temp file left


@pytest.mark.parametrize("content, match", [
    ("{bad json", "not valid JSON"),
    ("[1, 2]", "object"),
    (json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, " ": 3, "?": 4, "p": 4}), "share id 4"),  # the reference quirk
    (json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, " ": 3, "a": 5}), "gaps"),
    (json.dumps({"<s>": 0, "<pad>": 1, "</s>": 2, " ": 3}), "id 0 must be"),
])
def test_symmap_load_rejects_malformed(tmp_path, content, match):
    path = tmp_path / "symmap.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match) as e:
        Symmap.load(path)
    assert str(path) in str(e.value)


def test_symmap_load_missing_and_binary(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Symmap.load(tmp_path / "nope.json")
    bad = tmp_path / "bin.json"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="UTF-8"):
        Symmap.load(bad)


# --------------------------------------------------------------------------- .phn.txt


def test_phn_round_trip(tmp_path):
    tokens = phonemize("Hello world, how are you?")
    line = format_phonemes(tokens)
    assert "  " not in line and "|" in line
    path = tmp_path / "a.phn.txt"
    path.write_text(line + "\n", encoding="utf-8")
    assert read_phonemes(path) == tokens


def test_phn_reads_reference_format(tmp_path):
    path = tmp_path / "ref.phn.txt"
    path.write_text("h ə lˈ o ʊ   w ɜː l d ,   h a ʊ", encoding="utf-8")  # boundary = two empty tokens
    assert read_phonemes(path) == ["h", "ə", "lˈ", "o", "ʊ", B, "w", "ɜː", "l", "d", ",", B, "h", "a", "ʊ"]
    assert parse_phonemes("a | | b\n") == ["a", B, "b"]


def test_phn_errors(tmp_path):
    bad = tmp_path / "bad.phn.txt"
    bad.write_bytes(b"h \xe9 l")
    with pytest.raises(UserError, match="bad.phn.txt: not UTF-8"):
        read_phonemes(bad)
    empty = tmp_path / "empty.phn.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.phn.txt"):
        read_phonemes(empty)
    for tok in ("|", "", "a b"):
        with pytest.raises(ValueError):
            format_phonemes(["x", tok])


# --------------------------------------------------------------------------- stress modes in the symbol map


def test_symmap_records_its_stress_mode_in_json(tmp_path):
    separate = Symmap.build([phonemize("Hello there")])
    assert separate.stress == "separate"  # the mode its tokens show
    data = json.loads(separate.to_json())
    assert data["@stress"] == "separate" and list(data)[0] == "@stress"
    assert Symmap.from_json(separate.to_json()) == separate
    separate.save(tmp_path / "symmap.json")
    assert Symmap.load(tmp_path / "symmap.json").stress == "separate"

    merged = Symmap.build([phonemize("Hello there", stress="merged")])
    assert merged.stress == "merged" and "@stress" not in merged.to_json()  # written as before the modes
    old = {"<pad>": 0, "<s>": 1, "</s>": 2, " ": 3, "h": 4, "lˈ": 5}  # a map made before the modes
    assert Symmap.from_json(json.dumps(old)).stress == "merged"
    assert json.loads(Symmap.from_json(json.dumps(old)).to_json()) == old
    assert Symmap(["a"], stress="separate") != Symmap(["a"], stress="merged")
    assert Symmap.build([["a"]]).stress == "separate"  # no stress mark: the default for new maps
    assert Symmap.build([["a"]], base=merged).stress == "merged"
    with pytest.raises(UserError, match=r"s\.json: unknown stress mode 'both'"):
        Symmap.from_json(json.dumps({**old, "@stress": "both"}), source="s.json")


# ---------------------------------------------------------------- espeak-ng crashes stay in its child process

# A stand-in for the child that crashes (SIGSEGV, like espeak-ng does) on any chunk holding "BOOM".
_CRASHING_CHILD = """
import json, os, signal, sys
from vall_e.text.espeak_process import handle
for line in sys.stdin:
    req = json.loads(line)
    if any("BOOM" in c for c in req["chunks"]):
        os.kill(os.getpid(), signal.SIGSEGV)
    print(json.dumps(handle(req)), flush=True)
"""


@pytest.fixture
def crashing_child(monkeypatch):
    from vall_e.text import phonemes
    from vall_e.text.espeak_process import PhonemizerProcess

    child = PhonemizerProcess([sys.executable, "-c", _CRASHING_CHILD])
    monkeypatch.setattr(phonemes, "_process", child)
    monkeypatch.setattr(phonemes, "_process_pid", os.getpid())
    yield child
    child.close()


def test_a_text_that_crashes_espeak_is_a_user_error_naming_it(crashing_child):
    out = phonemize_many(["One sentence.", "Two BOOM sentences.", "Three."], on_error="return")
    assert out[0] == phonemize("One sentence.") and out[2] == phonemize("Three.")
    assert isinstance(out[1], UserError) and "crashed on text 'Two BOOM sentences.'" in str(out[1])
    with pytest.raises(UserError, match=r"crashed on text 'BOOM' \(exit "):
        phonemize("BOOM")
    assert phonemize("Still here.") == phonemize_many(["Still here."])[0]  # a new child took over


def test_g2p_names_the_transcript_espeak_crashed_on(crashing_child, tmp_path, capsys):
    from vall_e.emb.g2p import main
    from vall_e.utils.errors import run_main

    (tmp_path / "a.txt").write_text("Fine words.", encoding="utf-8")
    (tmp_path / "b.txt").write_text("A BOOM here.", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "b.txt" in err and "crashed" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "a.phn.txt").exists() and not (tmp_path / "b.phn.txt").exists()


def test_a_real_espeak_crash_is_survived():
    """espeak-ng (the espeakng-loader wheel of this writing) segfaults on this Portuguese text; whatever
    a later library does with it, the process goes on and the texts around it are phonemized."""
    out = phonemize_many(["worker", "© worker", "olá amigo"], "pt", on_error="return")
    assert isinstance(out[0], list) and isinstance(out[2], list)
    assert isinstance(out[1], list) or "crashed" in str(out[1])


def test_amphion_phones_survive_a_crash_in_the_same_child(crashing_child):
    """Amphion's front end (another phonemizer profile) goes through the same child process."""
    from vall_e.text.amphion import phones

    before = phones("Hello, world.")
    assert before == ["h", "ə", "l", "oʊ", ",", "_", "w", "ɜː", "l", "d", "."]
    with pytest.raises(UserError, match=r"espeak-ng crashed on the text 'A BOOM here\.' \(exit "):
        phones("A BOOM here.")
    assert phones("Hello, world.") == before


def test_an_unknown_phonemizer_profile_is_refused():
    from vall_e.text.espeak_process import handle

    assert "unknown phonemizer profile" in handle({"code": "en-us", "chunks": ["a"], "profile": "x"})["error"]
