"""VALL-E X's Chinese path: numbers -> Chinese numerals (cn2an), words (jieba) -> bopomofo with tone
marks (pypinyin), Latin letters spelled in bopomofo, bopomofo -> IPA with tone arrows.

Needs `pip install "vall-e[vallex-zh]"` (importing this module raises ImportError without it; the
front end turns that into a one-line error naming the extra). The two tables are VALL-E X's
transcription conventions (facts of what its model was trained on), applied in this order.
"""
from __future__ import annotations

import re

import cn2an
import jieba
from pypinyin import BOPOMOFO, lazy_pinyin

jieba.setLogLevel(60)  # no "Building prefix dict" chatter on first use

# letter -> its name in bopomofo (applied a..z, case-insensitive)
LETTERS = dict(zip("abcdefghijklmnopqrstuvwxyz", (
    "ㄟˉ ㄅㄧˋ ㄙㄧˉ ㄉㄧˋ ㄧˋ ㄝˊㄈㄨˋ ㄐㄧˋ ㄝˇㄑㄩˋ ㄞˋ ㄐㄟˋ ㄎㄟˋ ㄝˊㄛˋ ㄝˊㄇㄨˋ ㄣˉ ㄡˉ ㄆㄧˉ ㄎㄧㄡˉ ㄚˋ ㄝˊㄙˋ "
    "ㄊㄧˋ ㄧㄡˉ ㄨㄧˉ ㄉㄚˋㄅㄨˋㄌㄧㄡˋ ㄝˉㄎㄨˋㄙˋ ㄨㄞˋ ㄗㄟˋ").split()))

# bopomofo (and full-width punctuation) -> IPA, longest units first where they overlap; in order
TO_IPA = [tuple(pair.split("=")) for pair in (
    "ㄅㄛ=p⁼wo ㄆㄛ=pʰwo ㄇㄛ=mwo ㄈㄛ=fwo ㄅ=p⁼ ㄆ=pʰ ㄇ=m ㄈ=f ㄉ=t⁼ ㄊ=tʰ ㄋ=n ㄌ=l ㄍ=k⁼ ㄎ=kʰ ㄏ=x ㄐ=tʃ⁼ ㄑ=tʃʰ "
    "ㄒ=ʃ ㄓ=ts`⁼ ㄔ=ts`ʰ ㄕ=s` ㄖ=ɹ` ㄗ=ts⁼ ㄘ=tsʰ ㄙ=s ㄚ=a ㄛ=o ㄜ=ə ㄝ=ɛ ㄞ=aɪ ㄟ=eɪ ㄠ=ɑʊ ㄡ=oʊ ㄧㄢ=jɛn "
    "ㄩㄢ=ɥæn ㄢ=an ㄧㄣ=in ㄩㄣ=ɥn ㄣ=ən ㄤ=ɑŋ ㄧㄥ=iŋ ㄨㄥ=ʊŋ ㄩㄥ=jʊŋ ㄥ=əŋ ㄦ=əɻ ㄧ=i ㄨ=u ㄩ=ɥ ˉ=→ ˊ=↑ ˇ=↓↑ "
    "ˋ=↓ ˙= ，=, 。=. ！=! ？=? —=-").split(" ")]

_HAN = re.compile("[\u4e00-\u9fff]")


def numbers_to_chinese(text: str) -> str:
    for number in re.findall(r"\d+(?:\.?\d+)?", text):
        text = text.replace(number, cn2an.an2cn(number), 1)
    return text


def to_bopomofo(text: str) -> str:
    text = text.replace("、", "，").replace("；", "，").replace("：", "，")
    out = ""
    for word in jieba.lcut(text, cut_all=False):
        if not _HAN.search(word):
            out += word
            continue
        syllables = [re.sub(r"([\u3105-\u3129])$", r"\1ˉ", s) for s in lazy_pinyin(word, BOPOMOFO)]
        out += (" " if out else "") + "".join(syllables)
    return out


def chinese_ipa(text: str) -> str:
    text = to_bopomofo(numbers_to_chinese(text))
    for letter, name in LETTERS.items():
        text = re.sub(letter, name, text, flags=re.IGNORECASE)
    for unit, ipa in TO_IPA:
        text = text.replace(unit, ipa)
    text = re.sub("i([aoe])", r"j\1", text)
    text = re.sub("u([aoəe])", r"w\1", text)
    text = re.sub("([sɹ]`[⁼ʰ]?)([→↓↑ ]+|$)", r"\1ɹ`\2", text).replace("ɻ", "ɹ`")
    return re.sub("([s][⁼ʰ]?)([→↓↑ ]+|$)", r"\1ɹ\2", text)
