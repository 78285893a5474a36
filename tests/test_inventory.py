"""Phoneme inventories (`vall_e.text.inventory`): complete for each stored language, and what a symbol map
built from them holds."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from vall_e.text.inventory import PHONES, inventory_symbols, phone_inventory, stored_languages
from vall_e.text.phonemes import BOUNDARY, PUNCTUATION, STRESS_MARKS, phonemize, phonemize_many
from vall_e.text.symmap import SPECIALS, Symmap, corpus_symmap, inventory_symmap
from vall_e.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CORPUS_LANGUAGE = {"en-us": "en", "en-gb": "en", "de": "de", "fr-fr": "fr", "es": "es"}


def _generator():  # scripts/ is no package
    spec = importlib.util.spec_from_file_location("phoneme_inventory", ROOT / "scripts" / "phoneme_inventory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_languages_have_inventories():
    assert {"en-us", "de", "fr-fr", "es"} <= set(stored_languages())
    for code in stored_languages():
        phones = phone_inventory(code)
        assert phones and list(phones) == sorted(set(phones))
        for tok in phones:  # phone tokens only: no stress, boundary or punctuation, no lone marks
            assert not (set(tok) & STRESS_MARKS) and tok not in PUNCTUATION and not tok.isspace() and tok != "ː"
    assert phone_inventory("en") == phone_inventory("EN_us") == phone_inventory("en-us")
    assert phone_inventory("fr") == phone_inventory("fr-fr")
    assert {"iː", "ɹ", "θ", "ð", "ŋ"} <= set(phone_inventory("en")) and "ç" in phone_inventory("de")
    assert phone_inventory("xx-unknown") is None and phone_inventory("cmn") is None


GENERATOR = _generator()


def test_every_language_the_script_measures_is_stored():
    assert set(GENERATOR.LANGUAGES) == set(PHONES)


@pytest.mark.parametrize("language", GENERATOR.LANGUAGES)
def test_inventory_covers_generated_text(language):
    """The corpus generator's sentences and a fresh draw of pseudo-words, random letter strings, numbers
    and symbols (another seed than the one the table was computed with) emit no token outside it."""
    if language not in PHONES:
        pytest.skip(f"no inventory stored for {language}")
    texts = GENERATOR.sample_texts(language, 6000 if language in CORPUS_LANGUAGE else 3000, seed="test")
    if language in CORPUS_LANGUAGE:
        from vall_e.data.synthetic import make_sentences

        texts += make_sentences(400, seed=20261201, language=CORPUS_LANGUAGE[language])
    known = set(inventory_symbols([language])) | {BOUNDARY}
    outside: dict[str, str] = {}
    for text, tokens in zip(texts, phonemize_many(texts, language, on_error="return")):
        if isinstance(tokens, list):
            outside.update({t: text for t in tokens if t not in known})
    assert not outside, f"tokens outside the {language} inventory (run scripts/phoneme_inventory.py): {outside}"


def test_inventory_symbols_add_stress_and_punctuation(caplog):
    syms = inventory_symbols(["en", "de"])
    assert syms == sorted(set(syms))
    assert STRESS_MARKS <= set(syms) and PUNCTUATION <= set(syms)
    assert set(phone_inventory("en")) | set(phone_inventory("de")) <= set(syms)
    missing: list[str] = []
    assert inventory_symbols(["xx-unknown"], missing=missing) == sorted(STRESS_MARKS | PUNCTUATION)
    assert missing == ["xx-unknown"]


def test_corpus_without_some_phonemes_and_punctuation_gets_them_all():
    tokens = phonemize("Hello there")  # no θ, no comma, no question mark
    assert "θ" not in tokens and "," not in tokens
    symmap = corpus_symmap([("a.phn.txt", tokens), ("b.phn.txt", ["h", "ˈ", "zz"])], ["en"])
    assert symmap.stress == "separate"
    for sym in ("θ", "ʒ", ",", "?", "!", "«", "ˈ", "ˌ", "iː"):
        assert sym in symmap
    inventory = inventory_symbols(["en"])
    assert symmap.symbols == [*SPECIALS, *inventory, "zz"]  # specials, inventory, then corpus-only tokens
    assert corpus_symmap([("b.phn.txt", ["h", "ˈ", "zz"]), ("a.phn.txt", tokens)], ["en"]) == symmap
    # every token of any English text is known to such a map
    assert all(t in symmap for t in phonemize("Thirty thin thieves thought, didn't they? «Oui» (yes); pleasure!"))


def test_corpus_symmap_keeps_base_ids_and_adds_other_languages():
    base = Symmap(["zz", "a"], stress="separate")
    grown = corpus_symmap([("x", ["a", "ˈ", "b"])], ["en", "de"], base=base)
    assert grown.symbols[: len(base)] == base.symbols
    assert set(inventory_symbols(["en", "de"])) <= set(grown.symbols)
    assert "ç" in grown and "θ" in grown


def test_merged_corpus_keeps_the_corpus_only_map():
    """Corpora in the reference's merged mode (all data made before the modes existed) get today's map."""
    lists = [phonemize("Hello there, how are you?", stress="merged")]
    symmap = corpus_symmap([("a", lists[0])], ["en"])
    assert symmap == Symmap.build(lists) and symmap.stress == "merged"
    assert "θ" not in symmap and "lˈ" in symmap


def test_language_without_inventory_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="vall_e.text.symmap"):
        symmap = corpus_symmap([("a", ["k", "ˈ", "a"])], ["xx-unknown"])
    assert "xx-unknown" in caplog.text
    assert symmap.symbols[len(SPECIALS):] == [*sorted(STRESS_MARKS | PUNCTUATION), "a", "k"]  # shared, then corpus


def test_inventory_symmap_is_a_complete_map_for_a_language():
    english = inventory_symmap(["en"])
    assert english.stress == "separate" and english.symbols == [*SPECIALS, *inventory_symbols(["en"])]
    assert english == corpus_symmap([], ["en"])  # what data preparation builds for an English corpus, before its tokens
    assert inventory_symmap(["en"], extra=["zz", "a"]).symbols == [*english.symbols, "zz"]
    text = "Thirty thin thieves thought, didn't they? «Yes» (really); measure the azure vision: 1,250 boats!"
    assert all(t in english for t in phonemize(text))
    for bad in (["xx-unknown"], ["en", "cmn"], []):
        with pytest.raises(UserError, match="no stored phoneme inventory") as e:
            inventory_symmap(bad)
        assert "\n" not in str(e.value)


def test_files_in_two_modes_are_a_one_line_error():
    with pytest.raises(UserError, match=r"b\.phn\.txt: phonemes written with stress='merged'.*a\.phn\.txt") as e:
        corpus_symmap([("a.phn.txt", ["h", "ˈ", "a"]), ("n.phn.txt", ["a"]), ("b.phn.txt", ["hˈ", "a"])], ["en"])
    assert "\n" not in str(e.value) and "--stress" in str(e.value)
    with pytest.raises(UserError, match=r"c\.phn\.txt: .*stress='separate'.*the symbol map data/symmap\.json"):
        corpus_symmap([("c.phn.txt", ["h", "ˈ", "a"])], ["en"], base=Symmap(["hˈ"]), base_source="data/symmap.json")
