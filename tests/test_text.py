"""Text front-end: normalisation (wetext and fallback), sentence splitting, BPE tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import cosy.text.normalise as normalise_module
from cosy.errors import CosyError
from cosy.text.bpe import TextTokenizer
from cosy.text.normalise import chinese_integer, detect_lang, english_integer, fallback_normalise, normalise
from cosy.text.split import split_sentences
from cosy.text.symbols import EOS, LANGUAGE_TAGS, SOS, SPECIAL_TOKENS, TASK_ID, language_tag

# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("text,expected", [
    ("I have 23 apples.", "I have twenty three apples."),
    ("It costs $12 today.", "It costs twelve dollars today."),
    ("Born on Jan. 5, 2024.", "Born on the fifth of january, twenty twenty four."),
    ("Dr. Smith   bought 3.5 kg.", "doctor Smith bought three point five kilograms."),
    # around wetext's misreadings: escaped quotes, money, thousands separators, false abbreviations
    ('"Hello," she said.', '"Hello," she said.'),
    ("I paid $1.50 for 1,250 pens.", "I paid one dollar and fifty cents for one thousand two hundred fifty pens."),
    ("The Sun rose. Why not? No. Never.", "The Sun rose. Why not? No. Never."),
    ("Sun, 5 May", "Sunday, five May"),
])
def test_normalise_english(text: str, expected: str) -> None:
    assert normalise(text, "en") == expected


def test_normalise_chinese_and_auto() -> None:
    text = "今天是2024年5月6日，我有23个苹果。"
    expected = "今天是二零二四年五月六日，我有二十三个苹果。"
    assert normalise(text, "zh") == expected
    assert normalise(text, "auto") == expected


def test_normalise_rejects_unknown_language() -> None:
    with pytest.raises(CosyError, match="lang"):
        normalise("hello", "xx")


def test_detect_lang() -> None:
    assert detect_lang("Hello there 42") == "en"
    assert detect_lang("Hello 你好") == "zh"


class _BrokenNormalizer:
    def normalize(self, text: str) -> str:
        raise RuntimeError("grammar failure")


def test_fallback_when_wetext_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(normalise_module, "_wetext_normaliser", lambda lang: _BrokenNormalizer())
    text = "I  have\t23 apples,\n 1,250 pears and $4.50."
    assert normalise(text, "en") == \
        "I have twenty three apples, one thousand two hundred fifty pears and four dollars and fifty cents."
    assert normalise("增长50%，共2024人", "zh") == "增长百分之五十，共二千零二十四人"
    assert fallback_normalise("2024年我有10年经验", "zh") == "二零二四年我有十年经验"


def test_fallback_when_wetext_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    normalise_module._wetext_normaliser.cache_clear()
    monkeypatch.setitem(sys.modules, "wetext", None)  # makes `import wetext` raise ImportError
    try:
        assert normalise("Room 101 holds 7 people", "en") == "Room one hundred one holds seven people"
    finally:
        normalise_module._wetext_normaliser.cache_clear()


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (105, "one hundred five"),
    (1_000_001, "one million one"), (2_300_000_000, "two billion three hundred million"),
])
def test_english_integer(n: int, words: str) -> None:
    assert english_integer(n) == words


@pytest.mark.parametrize("n,words", [
    (0, "零"), (10, "十"), (15, "十五"), (101, "一百零一"), (110, "一百一十"), (1005, "一千零五"),
    (10001, "一万零一"), (100000001, "一亿零一"), (123456789, "一亿二千三百四十五万六千七百八十九"),
])
def test_chinese_integer(n: int, words: str) -> None:
    assert chinese_integer(n) == words


def test_fallback_reads_ordinals_times_and_minus() -> None:
    assert fallback_normalise("The 21st, 2nd, 3rd, 11th, 12th and 40th days.", "en") == \
        "The twenty first, second, third, eleventh, twelfth and fortieth days."
    assert fallback_normalise("Meet at 10:05, not 9:30 or 12:00.", "en") == \
        "Meet at ten oh five, not nine thirty or twelve o'clock."
    assert fallback_normalise("It was -5 today, 3-5 tomorrow.", "en") == "It was minus five today, three-five tomorrow."
    assert fallback_normalise("The 1,000th at -10:30, 5:30pm.", "en") == \
        "The one thousandth at minus ten thirty, five thirty p m."
    assert fallback_normalise("At 7:00 P.M. we go, or 6:15 a.m. Then.", "en") == \
        "At seven p m we go, or six fifteen a m. Then."
    assert fallback_normalise("At 1:23:45 on a 1:50,000 map", "en") == \
        "At one:twenty three:forty five on a one:fifty thousand map"  # not clock times


def test_fallback_reads_codes_digit_by_digit() -> None:
    assert fallback_normalise("Agent 007 scored 3.05%", "en") == "Agent zero zero seven scored three point zero five percent"
    assert fallback_normalise("Dr. Who paid $1", "en") == "doctor Who paid one dollar"


# ------------------------------------------------------------------ splitting

_EN = ("Dr. Smith went to Washington. He met J. Doe, a senator! It cost 3.5 dollars. Ok. "
       "Then he said \"No way.\" and left")


def test_split_english_sentences_keeps_abbreviations_and_decimals() -> None:
    pieces = split_sentences(_EN, "en", max_chars=200, min_chars=0)
    assert pieces == ["Dr. Smith went to Washington.", "He met J. Doe, a senator!", "It cost 3.5 dollars.",
                      "Ok.", "Then he said \"No way.\"", "and left"]
    assert split_sentences("I said no. Then No. 5 came. So do I. Then it ended.", "en", min_chars=0) == \
        ["I said no.", "Then No. 5 came.", "So do I.", "Then it ended."]


def test_split_merges_short_pieces() -> None:
    pieces = split_sentences(_EN, "en", max_chars=200, min_chars=10)
    assert "Ok." not in pieces and "It cost 3.5 dollars. Ok." in pieces
    assert pieces[-1] == "Then he said \"No way.\" and left"
    assert " ".join(pieces) == " ".join(_EN.split())


def test_split_long_sentence_at_commas_then_spaces() -> None:
    long = "One two three, four five six seven eight nine ten eleven twelve thirteen, fourteen."
    pieces = split_sentences(long, "en", max_chars=30, min_chars=0)
    assert pieces == ["One two three,", "four five six seven eight nine", "ten eleven twelve thirteen,",
                      "fourteen."]
    assert all(len(p) <= 30 for p in pieces)


def test_split_chinese() -> None:
    text = "今天天气很好。我们去公园吧！你觉得怎么样？好。那就走吧，带上水、面包和水果，还有相机。"
    pieces = split_sentences(text, "zh", max_chars=12, min_chars=3)
    assert pieces == ["今天天气很好。", "我们去公园吧！", "你觉得怎么样？好。", "那就走吧，带上水、", "面包和水果，还有相机。"]
    assert "".join(pieces) == text
    assert split_sentences("一二三四五六七八九十", "zh", max_chars=4, min_chars=0) == ["一二三四", "五六七八", "九十"]


def test_split_newlines_and_empty_input() -> None:
    assert split_sentences("First line here\nsecond line here", "en", min_chars=0) == \
        ["First line here", "second line here"]
    assert split_sentences("  \n ", "en") == []
    with pytest.raises(CosyError, match="max_chars"):
        split_sentences("text", "en", max_chars=5, min_chars=10)


# ------------------------------------------------------------------ BPE tokenizer

_CORPUS = ("The quick brown fox jumps over the lazy dog.\n"
           "A journey of a thousand miles begins with a single step.\n"
           "今天天气很好，我们去公园散步。\n") * 40


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(_CORPUS, encoding="utf-8")
    return path


def test_bpe_train_save_load_round_trip(corpus: Path, tmp_path: Path) -> None:
    tokenizer = TextTokenizer.train([corpus], vocab_size=400)
    # vocab_size is an upper bound: this small corpus runs out of pairs seen twice first
    assert len(SPECIAL_TOKENS) + 256 < tokenizer.vocab_size <= 400
    text = f"{language_tag('en')}The quick fox, café 😀 and 散步 unseen-word"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.token_to_id("<|en|>")
    assert tokenizer.decode(ids) == text  # byte-level: nothing is unknown
    # merges were learnt: frequent words take fewer tokens than bytes
    assert len(tokenizer.encode("The quick brown fox")) < len("The quick brown fox".encode()) / 2
    tokenizer.save(tmp_path / "model" / "tokenizer.json")
    for where in (tmp_path / "model" / "tokenizer.json", tmp_path / "model"):
        loaded = TextTokenizer.load(where)
        assert loaded.encode(text) == ids and loaded.vocab_size == tokenizer.vocab_size


def test_special_token_ids_are_stable(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("completely different text for another vocabulary\n" * 30, encoding="utf-8")
    first = TextTokenizer.train([corpus], vocab_size=300)
    second = TextTokenizer.train([other, corpus], vocab_size=400)
    assert set(LANGUAGE_TAGS.values()) <= set(SPECIAL_TOKENS)
    for index, token in enumerate(SPECIAL_TOKENS):
        assert first.token_to_id(token) == second.token_to_id(token) == index
    assert len({SOS, EOS, TASK_ID}) == 3
    assert first.encode(SOS + "x" + EOS)[0] == SPECIAL_TOKENS.index(SOS)


def test_load_a_tokenizer_made_another_way(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "!": 3}
    foreign = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    foreign.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    foreign.save(str(path))
    loaded = TextTokenizer.load(path)
    assert loaded.vocab_size == 4
    assert loaded.encode("hello world !") == [1, 2, 3]
    assert loaded.encode("hello there") == [1, 0]
    with pytest.raises(CosyError, match="not in the vocabulary"):
        loaded.token_to_id(SOS)


def test_bpe_errors_name_the_file(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(CosyError, match="missing.json"):
        TextTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(CosyError, match="bad.json"):
        TextTokenizer.load(bad)
    with pytest.raises(CosyError, match="nowhere.txt"):
        TextTokenizer.train([tmp_path / "nowhere.txt"], vocab_size=300)
    with pytest.raises(CosyError, match="vocab_size"):
        TextTokenizer.train([corpus], vocab_size=100)


def test_loading_for_a_model_checks_the_table_size_and_names_the_keys(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "!": 3}
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(path))

    def load(size, exact, where=str(path)):
        return TextTokenizer.load_for_model(where, "model.tok", size, "model.vocab", exact=exact)

    assert load(4, exact=True).vocab_size == 4
    assert load(10, exact=False).vocab_size == 4  # an embedding table may be larger
    assert load(None, exact=False).vocab_size == 4
    with pytest.raises(CosyError, match=r"has 4 tokens; config key 'model.vocab' is 10 and must equal"):
        load(10, exact=True)
    with pytest.raises(CosyError, match=r"'model.vocab' is 3 and must be at least"):
        load(3, exact=False)
    with pytest.raises(CosyError, match=r"config key 'model.tok' is empty"):
        load(4, exact=True, where="")
    with pytest.raises(CosyError, match=r"config key 'model.tok': tokenizer file not found"):
        load(4, exact=True, where=str(tmp_path / "missing.json"))
