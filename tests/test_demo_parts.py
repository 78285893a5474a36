"""The demo's parts that the slow end-to-end test cannot pin down: the training sentences keep the test
set's words out and vary, the unseen-word test set is laid out so no voice is prompted by a sentence it
must say, the training plan fits the budget, and the scores summarize as documented."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from vall_e.data.lexicon import common_words, lexicon_sentences, made_up_word, words_of
from vall_e.data.synthetic import generate_corpus
from vall_e.demo import harvard
from vall_e.demo.corpus import N_TARGETS, DemoData, unseen_items
from vall_e.demo.run import Clock, build_parser, plan_training
from vall_e.demo.scoring import summarize
from vall_e.utils.errors import UserError


def test_lexicon_sentences_are_seeded_varied_and_keep_excluded_words_out():
    excluded = harvard.all_words()
    a = lexicon_sentences(300, seed=3, excluded=excluded)
    assert a == lexicon_sentences(300, seed=3, excluded=excluded)
    assert a != lexicon_sentences(300, seed=4, excluded=excluded)
    assert len(set(a)) == len(a)  # no sentence twice
    words = [w for s in a for w in words_of(s)]
    assert not set(words) & excluded
    assert len(set(words)) > 0.6 * len(words)  # mostly new words: made-up ones rarely repeat
    assert all(4 <= len(s.split()) <= 10 and s[0].isupper() and s[-1] in ".?!" for s in a)
    assert any("," in s for s in a) and any(s.endswith("?") for s in a)  # punctuation the G2P keeps
    assert "the" in common_words() and len(common_words()) > 1000


def test_made_up_words_are_spellable_letters():
    rng = random.Random(0)
    for _ in range(200):
        w = made_up_word(rng)
        assert w.isalpha() and w.islower() and 1 <= len(w) <= 20


def test_words_of_splits_apostrophes_both_ways():
    assert words_of("It's the boy's CAR.") == {"it's", "it", "s", "the", "boy's", "boy", "car"}


def test_harvard_test_lists_are_not_the_development_lists():
    test = harvard.sentences()
    dev = harvard.sentences(harvard.DEVELOPMENT_LISTS)
    assert len(test) >= 30 and not set(test) & set(dev)
    assert set(harvard.TEST_LISTS).isdisjoint(harvard.DEVELOPMENT_LISTS)


def test_generate_corpus_speaks_given_texts_and_lexicon_sentences(tmp_path: Path):
    texts = ["The first test.", "A second one here."]
    wavs = generate_corpus(tmp_path / "t", n_speakers=2, texts=texts, group="unseen", progress=False)
    assert len(wavs) == 4
    assert sorted(w.with_suffix(".txt").read_text(encoding="utf-8").strip() for w in wavs) == sorted(texts * 2)
    wavs = generate_corpus(tmp_path / "l", n_speakers=1, n_utterances=3, sentences="lexicon",
                           exclude={"the", "a"}, progress=False)
    for w in wavs:
        assert not words_of(w.with_suffix(".txt").read_text(encoding="utf-8")) & {"the", "a"}
    with pytest.raises(UserError, match="lexicon sentences are English only"):
        generate_corpus(tmp_path / "x", n_speakers=1, sentences="lexicon", language="de", progress=False)
    with pytest.raises(UserError, match="sentences"):
        generate_corpus(tmp_path / "x", n_speakers=1, sentences="poems", progress=False)


def test_unseen_items_never_prompt_a_voice_with_a_sentence_it_says(tmp_path: Path):
    data = DemoData(tmp_path, tmp_path / "corpus", tmp_path / "unseen", tmp_path / "heldout", tmp_path / "cb")
    items = unseen_items(data, 4)
    assert len(items) == 4 * N_TARGETS
    for voice in {it.speaker for it in items}:
        mine = [it for it in items if it.speaker == voice]
        targets = {it.reference for it in mine}
        assert len(targets) == N_TARGETS and len({it.prompt for it in mine}) == 1
        assert mine[0].prompt not in targets
        for it in mine:
            assert it.reference not in it.others and len(it.others) == N_TARGETS - 1
            assert it.other_reference in targets and it.other_text != it.text
    # the voices between them say different sentences
    assert len({it.index for it in items}) > N_TARGETS


def test_plan_training_fits_what_the_budget_leaves():
    args = build_parser().parse_args(["--minutes", "20"])
    clock = Clock()
    clock.t0 -= 240  # 4 minutes of preparation already spent
    steps, minutes = plan_training(args, clock, {"seconds_per_step": 0.5}, 2400)
    assert 0 < minutes < 16 and steps == int(minutes * 60 / 0.5)
    fixed = build_parser().parse_args(["--train-steps", "77"])
    assert plan_training(fixed, clock, {"seconds_per_step": 0.5}, 2400) == (77, 0.0)
    tight = build_parser().parse_args(["--minutes", "5"])
    with pytest.raises(UserError, match="leaves no time to train"):
        plan_training(tight, clock, {"seconds_per_step": 0.5}, 2400)


def test_speaker_identification_counts_hits_and_margins(tmp_path: Path, monkeypatch):
    """Embeddings stand in for the speaker encoder (each file's name says where it points): two voices,
    one output near-tied and one taken for the other voice, one silent."""
    from vall_e.demo import report, scoring
    from vall_e.demo.corpus import TestItem

    directions = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "near_a": np.array([0.6, 0.5]),
                  "far_a": np.array([0.2, 1.0])}

    def embed(path):
        name = Path(path).stem.split("_", 1)[1]
        return None if name == "silent" else directions[name] / np.linalg.norm(directions[name])

    files = {name: tmp_path / f"{name}.wav" for name in ("0_a", "1_a", "2_b", "3_b", "4_near_a", "5_far_a", "6_silent")}
    monkeypatch.setattr(scoring, "speaker_encoder_for", lambda spec: (type("E", (), {"name": "stand-in"})(), None))
    monkeypatch.setattr(scoring, "load_audio", lambda path, sr, allow_silent=False: type("A", (), {"numpy": lambda self: path})())
    monkeypatch.setattr(scoring, "speaker_embedding", lambda path, sr, enc: embed(path))
    item = lambda speaker: TestItem(speaker, 0, "", Path(), Path(), [], "", Path())  # noqa: E731
    voices = {"a": [files["0_a"], files["1_a"]], "b": [files["2_b"], files["3_b"]]}
    sid = scoring.speaker_identification([item("a"), item("a"), item("a")],
                                         [files["4_near_a"], files["5_far_a"], files["6_silent"]], voices)
    near = directions["near_a"] / np.linalg.norm(directions["near_a"])
    far = directions["far_a"] / np.linalg.norm(directions["far_a"])
    assert sid["hits"] == 1 and sid["n"] == 3 and sid["nearest_is_own_voice"] == pytest.approx(1 / 3)
    assert sid["mean_margin"] == pytest.approx(((near[0] - near[1]) + (far[0] - far[1])) / 2)
    assert sid["min_margin"] == pytest.approx(far[0] - far[1]) and sid["min_margin"] < 0
    line = report._right_voice(sid)
    assert "1 of 3" in line and f"lowest {far[0] - far[1]:.3f}" in line and "stand-in" in line
    column = {"mcd_mean": 6.0, "under_8_5": 1.0, "closer_than_every_other": 1.0, "duration_within_15": 1.0}
    metrics = {"unseen_words": {"trained": column, "trained_other_text": column}, "speaker_identification": sid}
    assert report.headline(metrics).endswith("right voice 33% (1 of 3)")


def test_summarize_counts_a_missing_output_as_a_miss():
    rows = [{"mcd": 6.0, "closer": True, "duration": 1.0}, {"mcd": 9.0, "closer": False, "duration": 1.3},
            {"mcd": math.nan, "closer": False, "duration": 0.0}, {"mcd": 8.0, "closer": True, "duration": 0.9}]
    s = summarize(rows)
    assert s["mcd_mean"] == pytest.approx(np.mean([6.0, 9.0, 8.0]))
    assert s["under_8_5"] == pytest.approx(2 / 4) and s["closer_than_every_other"] == pytest.approx(2 / 4)
    assert s["duration_within_15"] == pytest.approx(2 / 4) and s["missing"] == 1


@pytest.mark.parametrize("argv, match", [
    (["--nar-levels", "7"], "trains no NAR"),                      # the default --p-ar 1.0 trains none
    (["--kv-heads", "3"], "must divide --heads 4"),
    (["--kv-heads", "2"], "--text-heads 1 must be a multiple"),   # 2 query heads per KV head
])
def test_demo_rejects_settings_that_cannot_work_before_any_work(argv: list[str], match: str, tmp_path: Path):
    from vall_e.demo.run import main
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        main(["--out", str(out), *argv])
    assert not out.exists()  # refused before preparing anything
