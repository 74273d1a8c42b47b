"""The speech-token LM as a training task: shard rows -> text ids, speech ids, x-vector."""

from __future__ import annotations

import logging

import torch
from torch.nn.utils.rnn import pad_sequence

from cosy.errors import CosyError
from cosy.llm.model import LLM, LLMConfig
from cosy.text.bpe import TextTokenizer
from cosy.train.task import Row, Task

log = logging.getLogger(__name__)


def load_text_tokenizer(cfg: LLMConfig) -> TextTokenizer:
    # A Hugging Face backbone brings its own embedding table, sized by its own config.
    vocab = cfg.text_vocab if cfg.backbone == "transformer" else None
    return TextTokenizer.load_for_model(cfg.tokenizer, "model.tokenizer", vocab, "model.text_vocab", exact=False)


def processors(cfg: LLMConfig, train: bool):
    tokenizer = load_text_tokenizer(cfg)
    needs_speaker = cfg.backbone == "transformer"
    max_positions = cfg.lm.max_len if cfg.backbone == "transformer" else None
    warned: set[str] = set()

    def drop(row: Row, why: str) -> None:
        if why not in warned:  # one line per kind of problem, not per utterance
            warned.add(why)
            log.warning("dropping utterance %s (and any later one with the same problem): %s", row.get("utt"), why)

    def tokenize(row: Row) -> Row | None:
        if row.get("speech_token") is None:
            return drop(row, "no speech tokens (run `cosy extract tokens` before writing shards)")
        if needs_speaker and row.get("embedding") is None:
            return drop(row, "no speaker embedding (run `cosy extract embeddings` before writing shards)")
        text = tokenizer.encode(row["text"])
        speech = list(row["speech_token"])
        if not text or not speech:
            return drop(row, "empty text or empty speech tokens")
        if len(text) > cfg.max_text_len:
            return drop(row, f"text longer than model.max_text_len ({cfg.max_text_len} tokens)")
        if max_positions is not None and len(text) + len(speech) + 4 > max_positions:
            return drop(row, f"sequence longer than model.lm.max_len ({max_positions})")
        if min(speech) < 0 or max(speech) >= cfg.speech_vocab:
            raise CosyError(f"utterance {row.get('utt')}: speech token {max(speech)} is outside the LM's speech "
                            f"vocabulary of {cfg.speech_vocab}: the speech tokenizer and config key "
                            "'model.speech_vocab' do not match")
        out = {"utt": row.get("utt"), "text_token": text, "speech_token": speech}
        if needs_speaker:
            out["embedding"] = list(row["embedding"])
        return out

    return [tokenize]


def collate(rows: list[Row]) -> dict:
    """-> text_token (B, T), text_token_len (B,), speech_token (B, S), speech_token_len (B,),
    embedding (B, dim) when the rows carry one; ids right-padded with 0."""
    text = [torch.tensor(r["text_token"], dtype=torch.long) for r in rows]
    speech = [torch.tensor(r["speech_token"], dtype=torch.long) for r in rows]
    batch = {
        "text_token": pad_sequence(text, batch_first=True),
        "text_token_len": torch.tensor([len(t) for t in text]),
        "speech_token": pad_sequence(speech, batch_first=True),
        "speech_token_len": torch.tensor([len(s) for s in speech]),
    }
    if all("embedding" in r for r in rows):
        batch["embedding"] = torch.tensor([r["embedding"] for r in rows], dtype=torch.float32)
    return batch


def num_frames(row: Row) -> int:
    return len(row["text_token"]) + len(row["speech_token"])


TASK = Task(name="llm", config_cls=LLMConfig, build=LLM, processors=processors, collate=collate,
            num_frames=num_frames)
