"""Text normalisation: write numbers, dates, currency and abbreviations out as words.

The grammars come from the pip package wetext (English and Chinese WeTextProcessing
FSTs, no compiler needed). When wetext is missing or fails on a sentence, a plain
fallback spells out numbers, currency and a few abbreviations, so synthesis never
stops on an odd input.

wetext's English grammar misreads some inputs, so they are handled around it: amounts
of money and numbers with thousands separators are spelt out by the fallback's rules
first ("$1.50" is not "one point five dollars", "1,234" not "thousand two hundred ...");
capitalised words that look like weekday abbreviations and "No." without a number after
them are hidden from it ("The Sun", "No. Never." stay as written); and the backslashes
it puts before quotes and backslashes are taken out again.
"""

from __future__ import annotations

import functools
import logging
import re

from cosy.errors import CosyError

log = logging.getLogger(__name__)

SUPPORTED = ("en", "zh")

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[,.;:!?])")
_NUMBER = re.compile(r"(?P<currency>[$€£¥])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)"
                     r"(?:\.(?P<frac>\d+))?(?P<percent>%)?")


def detect_lang(text: str) -> str:
    """"zh" when `text` contains a Chinese character, else "en"."""
    return "zh" if _HAN.search(text) else "en"


def normalise(text: str, lang: str = "en") -> str:
    """Spoken form of `text` in `lang` ("en", "zh" or "auto"), whitespace collapsed."""
    if lang == "auto":
        lang = detect_lang(text)
    if lang not in SUPPORTED:
        raise CosyError(f"normalise: lang must be one of {', '.join(SUPPORTED)} or auto, got '{lang}'")
    text = _SPACES.sub(" ", text).strip()
    if not text:
        return ""
    normaliser = _wetext_normaliser(lang)
    if normaliser is None:
        return fallback_normalise(text, lang)
    try:
        spoken = _english_with_wetext(text, normaliser) if lang == "en" else normaliser.normalize(text)
    except Exception as err:  # any grammar failure: fall back, never stop a synthesis
        log.warning("wetext failed on %r (%s); using the plain fallback", text[:80], err)
        spoken = fallback_normalise(text, lang)
    return _SPACES.sub(" ", spoken).strip()


_EN_OWN_NUMBER = re.compile(r"[$€£¥]\d|\d,\d{3}")  # a match of _NUMBER that the fallback reads
_EN_NOT_ABBREVIATION = re.compile(r"\b(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)\b(?!\.?,?\s*\d)|No(?=\.(?!\s*\d)))")
_WETEXT_ESCAPE = re.compile(r'\\(["\\])')


def _english_with_wetext(text: str, normaliser) -> str:
    text = _NUMBER.sub(lambda m: _padded(m, _en_number(m)) if _EN_OWN_NUMBER.search(m.group(0)) else m.group(0),
                       text)
    hidden = {}

    def hide(match: re.Match) -> str:
        mask = f"qzx{match.group(0).lower()}xzq"  # lower-case letters, which wetext passes through
        hidden[mask] = match.group(0)
        return mask

    spoken = normaliser.normalize(_EN_NOT_ABBREVIATION.sub(hide, text))
    for mask, word in hidden.items():
        spoken = spoken.replace(mask, word)
    return _WETEXT_ESCAPE.sub(r"\1", spoken)


@functools.lru_cache(maxsize=None)
def _wetext_normaliser(lang: str):
    """The wetext normaliser of `lang`, or None (warned about once) when not installed."""
    try:
        from wetext import Normalizer
    except ImportError:
        log.warning("wetext is not installed: text normalisation uses the plain fallback")
        return None
    return Normalizer(lang=lang, operator="tn")


# ------------------------------------------------------------------ plain fallback

_EN_ABBREVIATIONS = {"Mr.": "mister", "Mrs.": "missus", "Ms.": "miss", "Dr.": "doctor",
                     "Prof.": "professor", "vs.": "versus", "etc.": "et cetera", "e.g.": "for example",
                     "i.e.": "that is"}
_EN_ABBREVIATION = re.compile("|".join(r"\b" + re.escape(a) for a in _EN_ABBREVIATIONS))
_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_EN_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_EN_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
                "£": ("pound", "pounds", "penny", "pence"), "¥": ("yuan", "yuan", "fen", "fen")}
_EN_ORDINAL = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+|\d+)(?:st|nd|rd|th)\b")
_EN_ORDINAL_ENDINGS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                       "nine": "ninth", "twelve": "twelfth"}
# "10:05", "5:30pm"; not a ratio ("1:50,000") or hours:minutes:seconds
_EN_TIME = re.compile(r"(?<![\d:])([01]?\d|2[0-3]):([0-5]\d)(?!\d|[:,]\d)(?:\s?([aApP])\.?[mM]\b(?:\.(?=,|\s+[a-z]))?)?")
_EN_MINUS = re.compile(r"(?<![\w.,$€£¥])-(?=\d)")  # "-5", not "3-5", "pre-2000" or "$-5"
_ZH_DIGITS = "零一二三四五六七八九"
_ZH_CURRENCY = {"$": "美元", "€": "欧元", "£": "英镑", "¥": "元"}


def fallback_normalise(text: str, lang: str = "en") -> str:
    """Rule-based spoken form without wetext: numbers, decimals, %, currency (and, in
    English, common abbreviations)."""
    if lang == "en":
        text = _EN_ABBREVIATION.sub(lambda m: _EN_ABBREVIATIONS[m.group(0)], text)
        text = _EN_MINUS.sub("minus ", text)
        text = _EN_ORDINAL.sub(lambda m: english_ordinal(int(m.group(1).replace(",", ""))), text)
        text = _EN_TIME.sub(_en_time, text)
        text = _NUMBER.sub(lambda m: _padded(m, _en_number(m)), text)
        text = _SPACE_BEFORE_PUNCT.sub("", text)
    else:
        text = _NUMBER.sub(_zh_number, text)
    return _SPACES.sub(" ", text).strip()


def _padded(match: re.Match, words: str) -> str:
    """`words` for `match`, with a space on each side where a letter or digit touches it ("3kg" -> "three kg")."""
    text, start, end = match.string, match.start(), match.end()
    before = " " if start and text[start - 1].isalnum() else ""
    after = " " if end < len(text) and text[end].isalnum() else ""
    return before + words + after


def _en_number(match: re.Match) -> str:
    digits, frac = match.group("int").replace(",", ""), match.group("frac")
    currency = _EN_CURRENCY.get(match.group("currency") or "")
    if currency and frac is not None and len(frac) == 2:
        whole, cents = int(digits), int(frac)
        words = f"{english_integer(whole)} {currency[0] if whole == 1 else currency[1]}"
        if cents:
            words += f" and {english_integer(cents)} {currency[2] if cents == 1 else currency[3]}"
        return words
    words = _read_digits(digits, _EN_ONES, " ") if _read_as_digits(digits) else english_integer(int(digits))
    if frac is not None:
        words += " point " + _read_digits(frac, _EN_ONES, " ")
    if match.group("percent"):
        words += " percent"
    if currency:
        words += " " + (currency[0] if digits == "1" and frac is None else currency[1])
    return words


def english_ordinal(n: int) -> str:
    """English ordinal words of 0 <= n < 10**15 ("twenty first")."""
    words = english_integer(n).split(" ")
    last = words[-1]
    if last in _EN_ORDINAL_ENDINGS:
        words[-1] = _EN_ORDINAL_ENDINGS[last]
    else:
        words[-1] = last[:-1] + "ieth" if last.endswith("y") else last + "th"
    return " ".join(words)


def _en_time(match: re.Match) -> str:
    """"10:05" -> "ten oh five", "10:00" -> "ten o'clock", "5:30pm" -> "five thirty p m"."""
    hours, minutes, half = english_integer(int(match.group(1))), int(match.group(2)), match.group(3)
    if minutes == 0:
        spoken = hours if half else f"{hours} o'clock"
    else:
        spoken = f"{hours} {'oh ' if minutes < 10 else ''}{english_integer(minutes)}"
    return f"{spoken} {half.lower()} m" if half else spoken


def _zh_number(match: re.Match) -> str:
    digits, frac = match.group("int").replace(",", ""), match.group("frac")
    # a year (2024年) is read digit by digit, a count of years (10年) as a number
    is_year = match.string.startswith("年", match.end()) and len(digits) == 4 and frac is None
    by_digit = is_year or _read_as_digits(digits)
    words = _read_digits(digits, _ZH_DIGITS, "") if by_digit else chinese_integer(int(digits))
    if frac is not None:
        words += "点" + _read_digits(frac, _ZH_DIGITS, "")
    if match.group("percent"):
        words = "百分之" + words
    return words + _ZH_CURRENCY.get(match.group("currency") or "", "")


def _read_as_digits(digits: str) -> bool:
    """Leading zeros (codes like 007) and very long strings are read digit by digit."""
    return (len(digits) > 1 and digits[0] == "0") or len(digits) > 15


def _read_digits(digits: str, names, sep: str) -> str:
    return sep.join(names[int(d)] for d in digits)


def english_integer(n: int) -> str:
    """English words of 0 <= n < 10**15 ("one hundred five")."""
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        return _EN_TENS[n // 10] + (" " + _EN_ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _EN_ONES[n // 100] + " hundred" + (" " + english_integer(n % 100) if n % 100 else "")
    value, name = next((v, s) for v, s in _EN_SCALES if n >= v)
    rest = n % value
    return english_integer(n // value) + " " + name + (" " + english_integer(rest) if rest else "")


def chinese_integer(n: int) -> str:
    """Chinese reading of 0 <= n < 10**16 in groups of 万 and 亿 ("一万零五")."""
    if n == 0:
        return _ZH_DIGITS[0]
    groups = []
    while n:
        groups.append(n % 10000)
        n //= 10000
    units = ("", "万", "亿", "万亿")
    out, gap = "", False
    for i in reversed(range(len(groups))):
        if groups[i] == 0:
            gap = bool(out)
            continue
        if out and (gap or groups[i] < 1000):
            out += _ZH_DIGITS[0]
        out += _chinese_group(groups[i]) + units[i]
        gap = False
    # 10-19 at the start are read 十, 十一, ... without a leading 一
    return out[1:] if out.startswith("一十") else out


def _chinese_group(n: int) -> str:
    """Reading of 1 <= n <= 9999 with 千, 百, 十 and one 零 per run of inner zeros."""
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = n // value % 10
        if digit:
            out += (_ZH_DIGITS[0] if zero else "") + _ZH_DIGITS[digit] + unit
            zero = False
        elif out:
            zero = True
    return out
