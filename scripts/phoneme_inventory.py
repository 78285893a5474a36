"""Compute each language's phoneme inventory and write it into `vall_e/text/inventory.py`.

    python scripts/phoneme_inventory.py                      # compute and print the table
    python scripts/phoneme_inventory.py --write              # ... and rewrite inventory.py's table
    python scripts/phoneme_inventory.py --check              # exit 1 when the stored table differs
    python scripts/phoneme_inventory.py --languages it,ru --words 200000 --write   # some rows only

How the stored table was made (each row also records its tool versions and arguments in
`GENERATED_WITH`), on espeak-ng 1.52.0 (the `espeakng-loader` wheel), phonemizer 3.4.0, Faker 40.63.0:

    python scripts/phoneme_inventory.py --write --languages en-us,en-gb,de,fr-fr,es
    python scripts/phoneme_inventory.py --write --words 200000 --faker-items 16000 \
        --languages it,pt,nl,pl,sv,da,nb,fi,cs,sk,hu,ro,tr,vi,id,ca,ru,uk,el

The inventory of a language is every phone token the tokenizer (`vall_e.text.phonemes`, stress mode
"separate") emits for it. espeak-ng has no list of its phonemes per language that matches the
tokenizer's output (length marks, combining marks, the phonemes of words it reads with another
language's rules), so the inventory is measured: a large, varied text per language goes through the
same phonemizer backend the G2P uses, and every token that comes out is kept. The text is, per
language:

1. the synthetic corpus's sentences (`vall_e.data.synthetic.make_sentences`, for en, de, fr, es);
2. Faker's word lists, first and last names, cities, streets, countries, jobs and companies of the
   language's own locales and of 39 other Latin-script locales (foreign names and loan words, which
   espeak-ng may read with another language's phonemes); Faker is MIT-licensed (`pip install faker`);
3. `sample_texts`: pseudo-words made from the language's spelling units (onsets, vowel spellings,
   codas: written by hand for en, de, fr, es; for the other languages, `GENERIC_LETTERS`, their
   vowel and consonant letters and digraphs; lower case, capitalised and upper case, which espeak-ng
   spells letter by letter; one word in eight in en, de, fr or es spelling), random letter strings
   over the language's alphabet and every Latin letter with a diacritic, numbers, dates and symbols.
   The test (`tests/test_inventory.py`) draws another sample of the same kind with another seed,
   plus the corpus's sentences, and checks that no token falls outside the table.

The script prints, per language, the number of tokens, where each token was first seen and how many
new tokens the second half of the pseudo-word stream still found (0 means the stream had saturated).
Only the small table is committed; nothing this script reads or writes is needed at run time.

Languages: every alphabetic language of the built-in table (`vall_e.text.languages.ALIASES`) in
Latin, Cyrillic or Greek script. Not covered: ja, zh (cmn), yue, ko, ar, he and hi (other writing
systems, for which letter strings are no good sample); a corpus in one of them gets a symbol map of
its own tokens and a warning, and synthesis names a phoneme its model lacks in a one-line error. Text
in a script other than the language's own is not covered either: espeak-ng spells it letter by
letter with other languages' letter names, which adds odd tokens (a digit `1`, `ɛː` in English).
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import re
import sys
import time
import unicodedata
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vall_e.text.phonemes import BOUNDARY, PUNCTUATION, STRESS_MARKS, phonemize_many  # noqa: E402
from vall_e.data.lexicon import made_up_word  # noqa: E402

INVENTORY_FILE = ROOT / "vall_e" / "text" / "inventory.py"
LANGUAGES = ("en-us", "en-gb", "de", "fr-fr", "es", "it", "pt", "nl", "pl", "sv", "da", "nb", "fi", "cs", "sk", "hu",
             "ro", "tr", "vi", "id", "ca", "ru", "uk", "el")

# spelling units per language: (onsets, vowel spellings, codas, alphabet)
_EN = (
    "b bl br c ch cl cr d dr dw f fl fr g gh gl gn gr gu h j k kn l m n p ph pl pr ps qu r rh s sc sch scr sh "
    "shr sk sl sm sn sp sph spl spr squ st str sw t th thr tr tw v w wh wr x y z".split() + [""] * 6,
    "a e i o u y a e i o u ai ay au aw ea ee ei ey eu ew ie igh oa oe oi oo ou ow oy ue ui are ere ire ore ure "
    "ar er ir or ur".split(),
    "b bb ck ct d dd dge f ff ft g ge gh ght k l ld ll lk lm lt m mb mn mp n nce nd ng nk nt p ph pt r rd rk "
    "rm rn rt s se sh sk ss st t tch th ts tion sion ve x z ze ble cle tle ous ing ed es".split() + [""] * 8,
    "abcdefghijklmnopqrstuvwxyz",
)
_DE = (
    "b bl br ch d dr f fl fr g gl gn gr h j k kl kn kr l m n p pf pfl pfr ph pl pr qu r s sch schl schm "
    "schn schr schw sk sp spr st str t th tr ts v w z zw".split() + [""] * 6,
    "a e i o u y ä ö ü aa ah ai au äu ay e eh ee ei eu ey ie ieh ih oh oo oi uh ui ei ie ä ö ü er".split(),
    "b bs ch chs ck d dt f ff ft g ig ich isch k l ld ll lt m mm mpf n nd ng nk nn nz p pf ps r rb rch rd "
    "rf rg rk rm rn rt s sch sk sp ss st t tsch tt tz x z ß ung heit keit lich chen lein tion".split() + [""] * 8,
    "abcdefghijklmnopqrstuvwxyzäöüß",
)
_FR = (
    "b bl br c ch chr cl cr d dr f fl fr g gl gn gr gu h j l m n p ph pl pr ps qu r s sc sp st str t th tr "
    "v vr w x z".split() + [""] * 6,
    "a à â e é è ê ë i î ï o ô u ù û ü y ai aî ei au eau eu œu œ ou où oi oy an am en em in im ain aim ein "
    "ien ion on om un um oin ui uy ée ie ue".split(),
    "c ct d f g gne il ille l ll m n nt p r rd rt s sse ss st t x z que gue ve re le ne me te de ce ge "
    "ent es ez er et ès oux ail eil euil ouille tion isme iste age".split() + [""] * 10,
    "abcdefghijklmnopqrstuvwxyzàâæçéèêëîïôœùûüÿ",
)
_ES = (
    "b bl br c ch cl cr d dr f fl fr g gl gr gu gü h j k l ll m n ñ p pl pr qu r rr s t tr v w x y z".split()
    + [""] * 6,
    "a e i o u á é í ó ú ü ai au ei eu ia ie io iu oi ua ue ui uo ay ey oy uy".split(),
    "b c d g j l m n r s x z ns rs ción sión dad mente ble cto pt bs".split() + [""] * 12,
    "abcdefghijklmnopqrstuvwxyzáéíóúüñ",
)
# the other alphabetic languages of the built-in table (`vall_e.text.languages.ALIASES`): (vowel
# letters, consonant letters and digraphs). Their pseudo-words alternate the two (`generic_spelling`)
_VI_VOWELS = [unicodedata.normalize("NFC", v + t) for v in "aăâeêioôơuưy"
              for t in ("", "\u0300", "\u0301", "\u0303", "\u0309", "\u0323")]
GENERIC_LETTERS: dict[str, tuple[list[str], list[str]]] = {
    "it": (list("aeiouàèéìòù") + ["ia", "ie", "io", "uo"], list("bcdfglmnpqrstvz") + "ch gh gl gn sc sch qu zz".split()),
    "pt": (list("aeiouáâãàéêíóôõú") + ["ão", "õe", "ei", "ou"], list("bcçdfghjlmnpqrstvxz") + "ch lh nh rr ss qu gu".split()),
    "nl": (list("aeiouyëïé") + "aa ee oo uu ie oe eu ui ij ei ou au".split(), list("bcdfghjklmnpqrstvwxz") + "ch sch ng nk".split()),
    "pl": (list("aąeęioóuy"), list("bcćdfghjklłmnńprsśtwzźż") + "ch cz dz dź dż rz sz szcz".split()),
    "sv": (list("aeiouyåäö"), list("bcdfghjklmnpqrstvwxz") + "sj skj stj tj kj ng".split()),
    "da": (list("aeiouyæøå"), list("bcdfghjklmnpqrstvwxz") + "ng nd ld".split()),
    "nb": (list("aeiouyæøå"), list("bcdfghjklmnpqrstvwxz") + "kj skj sj ng".split()),
    "fi": (list("aeiouyäö") + "aa ee ii oo uu yy ää öö ai ei oi ui".split(), list("dhjklmnprstv") + "kk pp tt ng nk".split()),
    "cs": (list("aáeéěiíoóuúůyý"), list("bcčdďfghjklmnňpqrřsštťvwxzž") + ["ch"]),
    "sk": (list("aáäeéiíoóôuúyý") + ["ia", "ie", "iu"], list("bcčdďfghjklĺľmnňpqrŕsštťvwxzž") + ["ch", "dz", "dž"]),
    "hu": (list("aáeéiíoóöőuúüű"), list("bcdfghjklmnprstvz") + "cs dz dzs gy ly ny sz ty zs".split()),
    "ro": (list("aăâeiîou") + ["ea", "oa", "ia", "ie"], list("bcdfghjklmnprsștțvxz") + "ch gh".split()),
    "tr": (list("aeıioöuü"), list("bcçdfgğhjklmnprsştvyz")),
    "vi": (_VI_VOWELS, list("bcdđghklmnpqrstvx") + "ch gh gi kh ng ngh nh ph qu th tr".split()),
    "id": (list("aeiou") + ["ai", "au", "oi"], list("bcdfghjklmnprstwyz") + "kh ng ny sy".split()),
    "ca": (list("aeiouàèéíïòóúü"), list("bcçdfghjlmnpqrstvxz") + "l·l ny ix tx tg tj gu qu rr ss".split()),
    "ru": (list("аеёиоуыэюя"), list("бвгджзйклмнпрстфхцчшщ") + ["ь", "ъ"]),
    "uk": (list("аеєиіїоуюя"), list("бвгґджзйклмнпрстфхцчшщ") + ["ь", "дж", "дз"]),
    "el": (list("αάεέηήιίϊΐοόυύϋΰωώ") + "αι ει οι ου αυ ευ".split(), list("βγδζθκλμνξπρσςτφχψ") + "γκ μπ ντ τσ τζ".split()),
}
GENERIC_LOCALES = {"it": ["it_IT"], "pt": ["pt_PT", "pt_BR"], "nl": ["nl_NL", "nl_BE"], "pl": ["pl_PL"],
                   "sv": ["sv_SE"], "da": ["da_DK"], "nb": ["no_NO"], "fi": ["fi_FI"], "cs": ["cs_CZ"],
                   "sk": ["sk_SK"], "hu": ["hu_HU"], "ro": ["ro_RO"], "tr": ["tr_TR"], "vi": ["vi_VN"],
                   "id": ["id_ID"], "ca": [], "ru": ["ru_RU"], "uk": ["uk_UA"], "el": ["el_GR"]}


def generic_spelling(vowels: list[str], consonants: list[str]) -> tuple:
    """(onsets, vowel spellings, codas, alphabet) from a language's letters: single letters and digraphs."""
    alphabet = "".join(sorted({c for unit in vowels + consonants for c in unit if c.isalpha()}))
    return consonants + [""] * 4, vowels, consonants + [""] * 8, alphabet


# the hand-written spellings (also used for the one-in-eight foreign pseudo-words of every language)
RICH_SPELLING = {"en-us": _EN, "en-gb": _EN, "de": _DE, "fr-fr": _FR, "es": _ES}
SPELLING = {**RICH_SPELLING, **{k: generic_spelling(*v) for k, v in GENERIC_LETTERS.items()}}
CORPUS_LANGUAGE = {"en-us": "en", "en-gb": "en", "de": "de", "fr-fr": "fr", "es": "es"}
# Latin letters with diacritics (Latin-1 Supplement and Latin Extended-A), which users' text may hold
EXTRA_LETTERS = "".join(chr(c) for c in range(0xC0, 0x180) if chr(c).isalpha() and chr(c).islower())
SYMBOLS = list("%&@#$€£¥+=/*'’-_~^°§<>") + ["½", "©", "™", "±", "×"]
OWN_LOCALES = {"en-us": ["en_US", "en_CA"], "en-gb": ["en_GB", "en_IE"], "de": ["de_DE", "de_AT", "de_CH"],
               "fr-fr": ["fr_FR", "fr_CH"], "es": ["es_ES", "es_MX"], **GENERIC_LOCALES}
# names and places of many languages in Latin script: espeak-ng's dictionaries read some foreign
# words with another language's phonemes (English `Bach` has German `x`)
FOREIGN_LOCALES = ["en_US", "en_GB", "en_IE", "en_IN", "en_NG", "de_DE", "de_CH", "fr_FR", "fr_CA", "es_ES", "es_AR",
                   "it_IT", "nl_NL", "pl_PL", "pt_PT", "pt_BR", "cs_CZ", "sk_SK", "sl_SI", "hr_HR", "hu_HU", "ro_RO",
                   "sv_SE", "da_DK", "no_NO", "fi_FI", "et_EE", "lv_LV", "lt_LT", "is_IS", "ga_IE", "tr_TR", "az_AZ",
                   "id_ID", "vi_VN", "tl_PH", "sw", "yo_NG", "zu_ZA"]


# characters that crash espeak-ng 1.52.0 in a language (a segfault, which nothing in-process can catch):
# Portuguese reading `© worker`. They are taken out of that language's texts here and in the test.
ESPEAK_CRASHERS = {"pt": "©"}


def without_crashers(language: str, texts: list[str]) -> list[str]:
    bad = ESPEAK_CRASHERS.get(language, "")
    return [t.translate({ord(c): None for c in bad}) for t in texts] if bad else texts


def pseudo_word(rng: random.Random, spelling: tuple) -> str:
    onsets, vowels, codas, _ = spelling
    return made_up_word(rng, onsets, vowels, codas, syllables=(4, 4, 2, 1), coda_share=0.4)


def _case(rng: random.Random, word: str) -> str:
    r = rng.random()
    return word.upper() if r < 0.04 else word.capitalize() if r < 0.3 else word


def sample_texts(language: str, n_words: int, seed: int | str = 0) -> list[str]:
    """About `n_words` words of generated text for `language` (an espeak code of `SPELLING`), as lines of
    up to 12 words: pseudo-words from its spellings (and, one word in eight, from another language's),
    random letter strings over its alphabet and accented Latin letters, numbers, dates and symbols,
    with punctuation between them. Deterministic for a seed."""
    rng = random.Random(f"inventory:{language}:{seed}")
    own = SPELLING[language]
    others = [v for v in RICH_SPELLING.values() if v is not own]
    letters = own[3] + EXTRA_LETTERS
    lines: list[str] = []
    words = 0
    while words < n_words:
        line = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.70:
                w = _case(rng, pseudo_word(rng, own if rng.random() < 7 / 8 else rng.choice(others)))
            elif r < 0.85:
                w = _case(rng, "".join(rng.choice(letters) for _ in range(rng.randint(1, 8))))
            elif r < 0.92:
                w = rng.choice([str(rng.randint(0, 100)), str(rng.randint(0, 10**rng.randint(2, 9))),
                                f"{rng.randint(1, 31)}.{rng.randint(1, 12)}.{rng.randint(1900, 2100)}",
                                f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}", f"{rng.randint(0, 999)},{rng.randint(0, 99)}",
                                f"{rng.randint(1, 20)}{rng.choice(['st', 'nd', 'rd', 'th', 'e', 'er', 'º', 'ª', '.'])}"])
            else:
                sym = rng.choice(SYMBOLS)
                w = rng.choice([sym, f"{rng.randint(1, 99)}{sym}", f"{sym}{rng.randint(1, 99)}",
                                f"{pseudo_word(rng, own)}{sym}{pseudo_word(rng, own)}"])
            line.append(w + (rng.choice([",", ".", "!", "?", ";", ":", "…", " -", ""]) if rng.random() < 0.15 else ""))
        text = " ".join(line)
        if rng.random() < 0.1:
            text = rng.choice(['"{}"', "«{}»", "({})", "¿{}?", "¡{}!", "“{}”", "[{}]", "{} —"]).format(text)
        lines.append(text)
        words += len(line)
    return without_crashers(language, lines)


def faker_texts(locale: str, n_items: int, seed: int = 0) -> list[str]:
    """Words, names, places and jobs of one Faker locale (MIT-licensed word lists), as short lines."""
    from faker import Faker

    fake = Faker(locale)
    fake.seed_instance(seed)
    out: list[str] = []
    try:
        out += list(fake.get_words_list())
    except (AttributeError, TypeError):
        pass
    makers = ["first_name", "last_name", "city", "street_name", "country", "job", "company", "word", "name"]
    for _ in range(n_items // len(makers)):
        for m in makers:
            try:
                out.append(str(getattr(fake, m)()))
            except (AttributeError, TypeError, ValueError):
                continue
    return [" ".join(out[i:i + 8]) for i in range(0, len(out), 8)]


def _phonemize_chunk(texts: list[str], language: str) -> list[list[str] | None]:
    """(In the worker process) separate-stress tokens of each text, None where espeak-ng refused it."""
    return [t if isinstance(t, list) else None
            for t in phonemize_many(texts, language, on_error="return", stress="separate")]


class _Espeak:
    """espeak-ng in a worker process: a text may make it crash (a segfault, as `ESPEAK_CRASHERS`). A
    crash loses only the worker: the chunk is halved until the crashing text is found, and that text
    is skipped and printed, so a new crasher shows up in the output instead of killing the run."""

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None

    def phonemize(self, texts: list[str], language: str) -> list[list[str] | None]:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self.pool.submit(_phonemize_chunk, texts, language).result()
        except BrokenProcessPool:
            self.pool = None
            if len(texts) == 1:
                print(f"  {language}: espeak-ng crashed on {texts[0]!r}; skipped", file=sys.stderr)
                return [None]
            half = len(texts) // 2
            return self.phonemize(texts[:half], language) + self.phonemize(texts[half:], language)


_ESPEAK = _Espeak()


def measure(texts: list[str], language: str) -> Counter:
    counts: Counter = Counter()
    for start in range(0, len(texts), 2000):
        for tokens in _ESPEAK.phonemize(texts[start:start + 2000], language):
            if tokens is not None:
                counts.update(t for t in tokens if t != BOUNDARY and t not in PUNCTUATION and t not in STRESS_MARKS)
    return counts


def inventory(language: str, n_words: int, faker_items: int, seed: int) -> dict[str, str]:
    """{token: source that first emitted it}, printing how each source added to it."""
    sources: list[tuple[str, list[str]]] = []
    if language in CORPUS_LANGUAGE:
        from vall_e.data.synthetic import make_sentences

        sources.append(("corpus sentences",
                        make_sentences(max(1, n_words // 40), seed=seed, language=CORPUS_LANGUAGE[language])))
    try:
        for loc in OWN_LOCALES[language]:
            sources.append((f"faker {loc}", faker_texts(loc, faker_items, seed)))
        for loc in FOREIGN_LOCALES:
            if loc not in OWN_LOCALES[language]:
                sources.append((f"faker {loc} (foreign)", faker_texts(loc, faker_items // 8, seed)))
    except ImportError:
        sys.exit("this script needs Faker: pip install faker")
    sample = sample_texts(language, n_words, seed)
    half = len(sample) // 2
    sources += [("pseudo-words, first half", sample[:half]), ("pseudo-words, second half", sample[half:])]
    found: dict[str, str] = {}
    for name, texts in sources:
        texts = without_crashers(language, texts)
        t = time.perf_counter()
        counts = measure(texts, language)
        new = sorted(k for k in counts if k not in found)
        for k in new:
            found[k] = name
        print(f"  {language}: {name}: {len(texts)} lines, {len(counts)} tokens, {len(new)} new "
              f"{' '.join(f'{k}({counts[k]})' for k in new) if len(new) <= 40 else ''} "
              f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return found


def table_source(tables: dict[str, list[str]], generated_with: dict[str, str]) -> str:
    lines = ["# BEGIN GENERATED TABLE (scripts/phoneme_inventory.py; do not edit by hand)",
             "# language -> the tool versions and arguments its row was measured with",
             "GENERATED_WITH: dict[str, str] = {"]
    lines += [f"    {lang!r}: {generated_with[lang]!r}," for lang in sorted(tables)]
    lines += ["}", "# language -> its phone tokens, sorted", "PHONES: dict[str, str] = {"]
    lines += [f"    {lang!r}: {' '.join(tables[lang])!r}," for lang in sorted(tables)]
    lines += ["}", "# END GENERATED TABLE"]
    return "\n".join(lines)


_BLOCK = re.compile(r"# BEGIN GENERATED TABLE.*?# END GENERATED TABLE", re.S)


def stored_table(text: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(PHONES, GENERATED_WITH) of the table block in inventory.py's text, as it is on disk now."""
    block = _BLOCK.search(text)
    scope: dict = {}
    exec(block.group(0) if block else "", scope)  # noqa: S102 - our own generated file
    phones = {k: v.split() for k, v in scope.get("PHONES", {}).items()}
    made = scope.get("GENERATED_WITH", {})
    made = made if isinstance(made, dict) else {k: made for k in phones}  # the first format: one string
    return phones, {k: made.get(k, "") for k in phones}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", default=",".join(LANGUAGES), help=f"espeak codes of {', '.join(SPELLING)}")
    parser.add_argument("--words", type=int, default=600_000, help="pseudo-words etc. per language")
    parser.add_argument("--faker-items", type=int, default=40_000, help="Faker items per own locale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="rewrite the table in vall_e/text/inventory.py")
    parser.add_argument("--check", action="store_true", help="exit 1 when the stored table differs")
    args = parser.parse_args()
    import faker
    import phonemizer

    from vall_e.text.phonemes import _backend, _lock

    langs = [x.strip() for x in args.languages.split(",") if x.strip()]
    unknown = [x for x in langs if x not in SPELLING]
    if unknown:
        parser.error(f"no spelling units for {unknown}; add them to SPELLING first")
    with _lock:
        version = ".".join(map(str, _backend(langs[0]).version()))
    generated_with = (f"espeak-ng {version}, phonemizer {phonemizer.__version__}, Faker {faker.VERSION}; "
                      f"--words {args.words} --faker-items {args.faker_items} --seed {args.seed}")
    tables = {}
    for lang in langs:
        found = inventory(lang, args.words, args.faker_items, args.seed)
        tables[lang] = sorted(found)
        print(f"{lang}: {len(found)} phone tokens", file=sys.stderr)
    made = {lang: generated_with for lang in langs}
    print(table_source(tables, made))
    text = INVENTORY_FILE.read_text(encoding="utf-8")
    stored, stored_made = stored_table(text)
    if args.check:
        stale = [lang for lang in langs if stored.get(lang) != tables[lang]]
        if stale:
            print(f"the stored inventory differs for {', '.join(stale)}; run with --write", file=sys.stderr)
            return 1
    if args.write:  # the other languages' rows stay as they are
        source = table_source({**stored, **tables}, {**stored_made, **made})
        INVENTORY_FILE.write_text(_BLOCK.sub(lambda _: source, text, count=1), encoding="utf-8")
        print(f"wrote {INVENTORY_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
