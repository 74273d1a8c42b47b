"""Text front-end of cosy.

* `cosy.text.normalise`: `normalise(text, lang)` and `detect_lang(text)`;
* `cosy.text.split`: `split_sentences(text, lang)` for synthesis of long text;
* `cosy.text.bpe`: `TextTokenizer`, byte-level BPE (train, save, load any tokenizer.json);
* `cosy.text.symbols`: the special tokens, defined once.
"""
