"""Special tokens of cosy's text vocabulary, defined once.

Every BPE tokenizer cosy trains registers `SPECIAL_TOKENS` first, in this order, so
their ids are 0..len(SPECIAL_TOKENS)-1 in any vocabulary it builds. Models refer to them
by these names, never by literal strings or numbers.
"""

from __future__ import annotations

from cosy.errors import CosyError

PAD = "<|pad|>"
UNK = "<|unk|>"
SOS = "<|sos|>"
EOS = "<|eos|>"
TASK_ID = "<|task_id|>"

# Language tags are prepended to the text so one model can speak several languages.
LANGUAGES = ("en", "zh", "ja", "ko", "yue")
LANGUAGE_TAGS = {lang: f"<|{lang}|>" for lang in LANGUAGES}

SPECIAL_TOKENS = (PAD, UNK, SOS, EOS, TASK_ID, *LANGUAGE_TAGS.values())


def language_tag(lang: str) -> str:
    """The tag token of language code `lang` (e.g. "en" -> "<|en|>")."""
    if lang not in LANGUAGE_TAGS:
        raise CosyError(f"unknown language '{lang}' (known: {', '.join(LANGUAGES)})")
    return LANGUAGE_TAGS[lang]
