"""Split long text into sentence-sized pieces for synthesis.

Pieces end at sentence punctuation (English and Chinese); a sentence longer than
`max_chars` is cut at clause punctuation, then at spaces (or anywhere, in Chinese);
pieces shorter than `min_chars` are merged with a neighbour, because very short inputs
make the LM ramble.
"""

from __future__ import annotations

import re

from cosy.errors import CosyError
from cosy.text.normalise import detect_lang

# (max_chars, min_chars): a Chinese character carries about as much speech as an
# English word of four or five letters.
DEFAULT_LIMITS = {"en": (200, 20), "zh": (80, 8)}

_CLOSERS = re.escape("\"'”’」』）)]")
# Chinese marks end a sentence anywhere; ASCII ones only before a space or the end, so
# that 3.5 and e.g. "U.S.A." inside a word stay whole.
_SENTENCE_END = re.compile(rf"[。！？；…]+[{_CLOSERS}]*|[.!?;]+[{_CLOSERS}]*(?=\s|$)")
_CLAUSE_END = re.compile(rf"[,，、:：—]+[{_CLOSERS}]*")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "jr", "sr", "no"}


def split_sentences(text: str, lang: str = "en", max_chars: int | None = None,
                    min_chars: int | None = None) -> list[str]:
    """Pieces of `text`, each at most `max_chars` long unless a single word is longer.

    `lang` is "en", "zh" or "auto"; it decides the default limits and whether pieces are
    joined with a space. Newlines always end a piece.
    """
    if lang == "auto":
        lang = detect_lang(text)
    if lang not in DEFAULT_LIMITS:
        raise CosyError(f"split_sentences: lang must be one of {', '.join(DEFAULT_LIMITS)} or auto, "
                        f"got '{lang}'")
    max_chars = DEFAULT_LIMITS[lang][0] if max_chars is None else max_chars
    min_chars = DEFAULT_LIMITS[lang][1] if min_chars is None else min_chars
    if max_chars < 1 or min_chars > max_chars:
        raise CosyError(f"split_sentences: need 1 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    sep = " " if lang == "en" else ""
    pieces = []
    for line in text.splitlines():
        for sentence in _cut(line, _sentence_ends(line)):
            pieces.extend(_shorten(sentence, max_chars, sep))
    return _merge_short(pieces, min_chars, max_chars, sep)


def _sentence_ends(text: str) -> list[int]:
    ends = []
    for match in _SENTENCE_END.finditer(text):
        word = text[:match.start()].rsplit(None, 1)[-1] if text[:match.start()].strip() else ""
        # "Dr. Smith", "J. Smith", "U.S. law", "No. 5": a period after these is not a full
        # stop; after "no", "I" or a lower-case letter it is ("I said no. Then", "So do I.")
        number_follows = text[match.end():].lstrip()[:1].isdigit()
        is_abbreviation = match.group(0) == "." and (
            (word.lower() in _ABBREVIATIONS and (word.lower() != "no" or number_follows))
            or (len(word) == 1 and word.isupper() and word != "I") or "." in word)
        if not is_abbreviation:
            ends.append(match.end())
    return ends


def _cut(text: str, ends: list[int]) -> list[str]:
    """`text` cut after each position in `ends`, stripped, empty parts dropped."""
    bounds = [0, *ends, len(text)]
    parts = (text[a:b].strip() for a, b in zip(bounds, bounds[1:]))
    return [p for p in parts if p]


def _shorten(sentence: str, max_chars: int, sep: str) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    clauses = _cut(sentence, [m.end() for m in _CLAUSE_END.finditer(sentence)])
    units = [u for clause in clauses for u in (_split_words(clause, max_chars, sep)
                                                if len(clause) > max_chars else [clause])]
    return _pack(units, max_chars, sep)


def _split_words(clause: str, max_chars: int, sep: str) -> list[str]:
    """An over-long clause as words (English) or as max_chars-sized runs (Chinese)."""
    if sep:
        return _pack(clause.split(), max_chars, sep)
    return [clause[i:i + max_chars] for i in range(0, len(clause), max_chars)]


def _pack(units: list[str], max_chars: int, sep: str) -> list[str]:
    """Greedily join consecutive units while the result fits in max_chars."""
    out: list[str] = []
    for unit in units:
        if out and len(out[-1]) + len(sep) + len(unit) <= max_chars:
            out[-1] += sep + unit
        else:
            out.append(unit)
    return out


def _merge_short(pieces: list[str], min_chars: int, max_chars: int, sep: str) -> list[str]:
    out: list[str] = []
    for piece in pieces:
        short = len(piece) < min_chars or (out and len(out[-1]) < min_chars)
        if out and short and len(out[-1]) + len(sep) + len(piece) <= max_chars:
            out[-1] += sep + piece
        else:
            out.append(piece)
    return out
