"""Text tokenizer: byte-level BPE trained with Hugging Face `tokenizers`.

A trained tokenizer has the special tokens of `cosy.text.symbols` at ids
0..len(SPECIAL_TOKENS)-1 and covers every byte, so no text is ever unknown. Any
existing tokenizer.json (Whisper's, Qwen's, ...) loads the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from cosy.errors import CosyError
from cosy.text.symbols import SPECIAL_TOKENS


class TextTokenizer:
    """Text <-> token ids. Special tokens written in the text (e.g. "<|en|>") map to
    their own ids; `encode` adds nothing else, the models place sos/eos themselves."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<in memory>"):
        self._tokenizer = tokenizer
        self.source = source

    @classmethod
    def train(cls, files: Iterable[str | Path], vocab_size: int, min_frequency: int = 2) -> "TextTokenizer":
        """Learn `vocab_size` tokens (specials and the 256 bytes included) from text files."""
        files = [str(f) for f in files]
        for name in files:
            if not Path(name).is_file():
                raise CosyError(f"tokenizer training text not found: {name}")
        smallest = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
        if vocab_size < smallest:
            raise CosyError(f"vocab_size must be at least {smallest} (special tokens + 256 bytes), "
                            f"got {vocab_size}")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        try:
            tokenizer.train(files, trainer)
        except Exception as err:  # e.g. a file that is not UTF-8
            raise CosyError(f"cannot train a tokenizer on {', '.join(files)}: {err}") from err
        return cls(tokenizer, source="trained on " + ", ".join(files))

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """Read a tokenizer.json, or the tokenizer.json inside directory `path`."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CosyError(f"tokenizer file not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise CosyError(f"cannot read tokenizer {path}: {err}") from err
        return cls(tokenizer, source=str(path))

    @classmethod
    def load_for_model(cls, path: str, path_key: str, vocab_size: int | None, vocab_key: str,
                       exact: bool) -> "TextTokenizer":
        """Load the tokenizer a model config names and check it fits the model's table.

        `exact`: the model predicts text tokens, so the sizes must be equal; otherwise it
        only embeds them, and a larger table than the tokenizer is fine. `vocab_size=None`
        skips the check (the model's table is sized elsewhere).
        """
        if not path:
            raise CosyError(f"config key '{path_key}' is empty: give the path of a text tokenizer.json")
        try:
            tokenizer = cls.load(path)
        except CosyError as err:
            raise CosyError(f"config key '{path_key}': {err}") from err
        if vocab_size is not None and (tokenizer.vocab_size > vocab_size
                                       or (exact and tokenizer.vocab_size != vocab_size)):
            relation = "must equal" if exact else "must be at least"
            raise CosyError(f"text tokenizer {path} has {tokenizer.vocab_size} tokens; config key "
                            f"'{vocab_key}' is {vocab_size} and {relation} that")
        return tokenizer

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """Id of `token` (normally a special token from cosy.text.symbols)."""
        index = self._tokenizer.token_to_id(token)
        if index is None:
            raise CosyError(f"token {token!r} is not in the vocabulary of tokenizer {self.source}")
        return index
