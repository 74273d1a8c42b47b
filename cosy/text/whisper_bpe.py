"""Whisper's multilingual BPE, the text tokenizer of CosyVoice v1, as a cosy `TextTokenizer`.

Whisper ships its vocabulary as a tiktoken file: one line `<base64 bytes> <rank>` per
token. Text is split with GPT-2's pre-tokenizer regex, each piece starts as single bytes,
and the adjacent pair whose concatenation has the lowest rank is merged until none is a
token. The special tokens follow the ranks in the order of `whisper_specials`; with the
50257-rank `multilingual.tiktoken` and 100 languages this gives 51866 ids:
<|endoftext|> 50257, <|startoftranscript|> 50258, <|en|> 50259 ... <|yue|> 50358,
<|translate|> 50359 ... <|notimestamps|> 50364, <|0.00|> 50365 ... <|30.00|> 51865.

`whisper_tokenizer` rewrites the ranks as a Hugging Face byte-level BPE (every split of a
token into two tokens becomes a merge, ordered by the token's rank), so the result
saves as a plain tokenizer.json and loads with `TextTokenizer.load` without tiktoken.
Special tokens written in the text map to their ids, as with tiktoken's
`allowed_special="all"` that the reference uses.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from cosy.errors import CosyError
from cosy.text.bpe import TextTokenizer

# Whisper's language tokens, in id order (the first 100 of its table).
WHISPER_LANGUAGES = (
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it", "id",
    "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur", "hr", "bg",
    "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn", "et", "mk", "br",
    "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn", "yo", "so",
    "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt",
    "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw", "su", "yue",
)
WHISPER_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in 0.02 s steps


def whisper_specials(num_languages: int = 100) -> list[str]:
    """Whisper's special tokens in id order (CosyVoice v1 uses 100 languages)."""
    if not 0 < num_languages <= len(WHISPER_LANGUAGES):
        raise CosyError(f"num_languages must be 1..{len(WHISPER_LANGUAGES)}, got {num_languages}")
    return ["<|endoftext|>", "<|startoftranscript|>",
            *(f"<|{lang}|>" for lang in WHISPER_LANGUAGES[:num_languages]),
            "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
            "<|notimestamps|>", *(f"<|{i * 0.02:.2f}|>" for i in range(WHISPER_TIMESTAMPS))]


def installed_vocabulary() -> Path:
    """`multilingual.tiktoken` of an installed openai-whisper package (not imported)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or spec.origin is None:
        raise CosyError("no multilingual.tiktoken given and the openai-whisper package is not installed: "
                        "pass --tiktoken PATH or `pip install --no-deps openai-whisper`")
    path = Path(spec.origin).parent / "assets" / "multilingual.tiktoken"
    if not path.is_file():
        raise CosyError(f"the installed whisper package has no {path}: pass --tiktoken PATH")
    return path


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Token bytes -> rank of a tiktoken file; ranks must be 0..n-1 and cover all 256 bytes."""
    path = Path(path)
    if not path.is_file():
        raise CosyError(f"tiktoken vocabulary not found: {path}")
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected '<base64> <rank>'")
            ranks[base64.b64decode(fields[0])] = int(fields[1])  # Whisper's file has one empty token
        except (ValueError, binascii.Error) as err:
            raise CosyError(f"{path}:{number}: not a tiktoken line ({err})") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CosyError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CosyError(f"{path}: single bytes {missing[:8]} are not tokens, so some text cannot be encoded")
    return ranks


def byte_alphabet() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE writes it as (GPT-2's convention:
    printable Latin-1 bytes stand for themselves, the others take the code points from 256 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def whisper_tokenizer(path: str | Path, num_languages: int = 100) -> TextTokenizer:
    """The tiktoken vocabulary `path` plus Whisper's special tokens as a `TextTokenizer`."""
    ranks = read_ranks(path)
    alphabet = byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        for cut in range(1, len(token)):
            if token[:cut] in ranks and token[cut:] in ranks:
                merges.append((text(token[:cut]), text(token[cut:])))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = whisper_specials(num_languages)
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for index, special in enumerate(specials, len(ranks)):
        if tokenizer.token_to_id(special) != index:
            raise CosyError(f"{path}: special token {special} would get id {tokenizer.token_to_id(special)}, "
                            f"Whisper's layout gives {index} (is it also an ordinary token?)")
    return TextTokenizer(tokenizer, source=f"{path} (Whisper BPE, {num_languages} languages)")
