"""`cosy eval tokenizer --data DIR --tokenizer MODEL`: how good are the tokens?

Reports, on a dev or test data dir:

* WER / CER of the tokenizer's own ASR head (greedy CTC), after the project's WER text
  normalisation (cosy.eval.asr.normalise_for_wer); cosy checkpoints only, since an ONNX
  tokenizer has no ASR head;
* codebook usage: share of the codes used, entropy (bits) and perplexity of the codes;
* tokens per second of audio, and the real-time factor of tokenizing;
* speaker leakage: accuracy of a nearest-centroid speaker classifier on each utterance's
  normalised token histogram, trained on half of every speaker's utterances and tested
  on the other half, next to chance and next to the same classifier on pooled log-mel
  (mean and standard deviation over time), which shows how much identity the input had.

Writes PREFIX.json and PREFIX.md (default DIR/tokenizer_eval) and prints the Markdown.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jiwer
import numpy as np
import torch

from cosy.data.kaldi import DataDir
from cosy.errors import CosyError
from cosy.eval.asr import normalise_for_wer
from cosy.eval.report import report_prefix, write_report
from cosy.tokenizer.extract import (OnnxBackend, TorchBackend, load_tokenizer, map_windows, readable_features,
                                    tokenize_stream, window_frames)
from cosy.tokenizer.model import load_text_tokenizer
from cosy.tokenizer.quantize import codebook_usage

log = logging.getLogger(__name__)

# codebook sizes of the released ONNX tokenizers, by subsampling factor
RELEASED_CODEBOOKS = {2: 4096, 4: 6561}


def speaker_split(utt2spk: dict[str, str]) -> tuple[list[str], list[str]]:
    """Every speaker's sorted utterances alternate between train and test; speakers with
    a single utterance are left out (they could not be recognised)."""
    by_speaker: dict[str, list[str]] = {}
    for utt in sorted(utt2spk):
        by_speaker.setdefault(utt2spk[utt], []).append(utt)
    train, test = [], []
    for utts in by_speaker.values():
        if len(utts) >= 2:
            train += utts[0::2]
            test += utts[1::2]
    return train, test


def nearest_centroid_accuracy(vectors: dict[str, np.ndarray], utt2spk: dict[str, str]) -> dict[str, float] | None:
    """Share of test utterances whose closest speaker centroid (cosine, after removing the
    training mean) is their own speaker's; `chance` is 1 / number of speakers. None when
    no speaker has two utterances."""
    train, test = speaker_split({u: utt2spk[u] for u in vectors})
    if not test:
        return None

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    mean = np.mean([vectors[u] for u in train], axis=0)
    speakers = sorted({utt2spk[u] for u in train})
    centroids = unit(np.stack([np.mean([unit(vectors[u] - mean) for u in train if utt2spk[u] == s], axis=0)
                               for s in speakers]))
    queries = unit(np.stack([vectors[u] - mean for u in test]))
    predicted = [speakers[i] for i in (queries @ centroids.T).argmax(-1)]
    correct = sum(p == utt2spk[u] for p, u in zip(predicted, test))
    return {"accuracy": correct / len(test), "chance": 1 / len(speakers), "speakers": len(speakers),
            "test_utterances": len(test)}


def token_histogram(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    counts = np.bincount(tokens, minlength=codebook_size).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def evaluate(data_dir: str | Path, backend, batch_size: int = 8, num_workers: int = 0,
             codebook_size: int | None = None) -> dict:
    """All the metrics above as a dict (see the module docstring). A model trained with the
    `none` quantiser has no tokens: only its ASR scores are reported (`tokens` is None)."""
    if batch_size < 1:
        raise CosyError(f"--batch-size must be at least 1, got {batch_size}")
    data = DataDir.load(data_dir)
    skipped: list[tuple[str, str]] = []
    items = list(readable_features(data, data.utts, backend.mel, num_workers, skipped))
    if not items:
        raise CosyError(f"data dir {data_dir}: no utterance could be read")
    frames_per_second = backend.mel.sample_rate / backend.mel.hop_length
    seconds = sum(item.feats.shape[1] for item in items) / frames_per_second
    torch_model = backend.model if isinstance(backend, TorchBackend) else None
    report = {
        "data": str(data_dir),
        "utterances": len(items),
        "skipped": [u for u, _ in skipped],
        "audio_seconds": seconds,
        "asr": None if torch_model is None else transcription_scores(backend, items, data, batch_size),
        "tokens": None,
    }
    if torch_model is not None and torch_model.quantizer.codebook_size == 0:
        return report
    if codebook_size is None:
        codebook_size = (torch_model.quantizer.codebook_size if torch_model is not None
                         else RELEASED_CODEBOOKS[backend.rate_factor])
    report["tokens"] = token_scores(backend, items, data, batch_size, codebook_size, seconds)
    return report


def token_scores(backend, items, data: DataDir, batch_size: int, codebook_size: int, seconds: float) -> dict:
    """Codebook usage, token rate, real-time factor and speaker leakage."""
    start = time.perf_counter()
    tokens = dict(tokenize_stream(backend, items, batch_size))
    elapsed = time.perf_counter() - start
    all_tokens = np.concatenate(list(tokens.values()))
    if all_tokens.max() >= codebook_size:
        raise CosyError(f"--codebook-size {codebook_size} is too small: token {int(all_tokens.max())} occurs")
    histograms = {u: token_histogram(t, codebook_size) for u, t in tokens.items()}
    pooled_mel = {item.utt: torch.cat([item.feats.mean(1), item.feats.std(1)]).numpy() for item in items}
    return {
        "count": int(all_tokens.size),
        "per_second": all_tokens.size / seconds,
        "real_time_factor": elapsed / seconds,
        "codebook_size": codebook_size,
        "codebook": codebook_usage(torch.from_numpy(all_tokens.astype(np.int64)), codebook_size),
        "speaker_leakage": {
            "tokens": nearest_centroid_accuracy(histograms, data.utt2spk),
            "log_mel": nearest_centroid_accuracy(pooled_mel, data.utt2spk),
        },
    }


def transcription_scores(backend: TorchBackend, items, data: DataDir, batch_size: int) -> dict:
    """WER and CER of greedy CTC transcripts against the data dir's `text`."""
    text_tokenizer = load_text_tokenizer(backend.model.cfg)

    def transcribe(feats, lengths):
        ids = backend.model.transcribe(feats.to(backend.device), lengths.to(backend.device))
        return [np.asarray(row, dtype=np.int64) for row in ids]

    hypotheses = dict(map_windows(transcribe, items, window_frames(backend), batch_size))
    utts = sorted(hypotheses)
    refs = [normalise_for_wer(data.text[u]) for u in utts]
    hyps = [normalise_for_wer(text_tokenizer.decode(hypotheses[u].tolist())) for u in utts]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        raise CosyError(f"{data.path}/text: no utterance has a transcript left after WER normalisation")
    refs, hyps = [refs[i] for i in keep], [hyps[i] for i in keep]
    return {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps), "utterances": len(keep),
            "examples": [{"utt": utts[i], "ref": r, "hyp": h} for i, r, h in zip(keep[:3], refs, hyps)]}


def format_markdown(report: dict) -> str:
    asr, tok = report["asr"], report["tokens"]
    lines = [
        f"# Tokenizer evaluation on {report['data']}",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| utterances (skipped) | {report['utterances']} ({len(report['skipped'])}) |",
        f"| audio | {report['audio_seconds']:.1f} s |",
    ]
    if asr is None:
        lines.append("| WER / CER (greedy CTC) | n/a (an ONNX tokenizer has no ASR head) |")
    else:
        lines += [f"| WER (greedy CTC) | {100 * asr['wer']:.2f} % |",
                  f"| CER (greedy CTC) | {100 * asr['cer']:.2f} % |"]
    if tok is None:
        lines.append("| tokens | none (quantizer kind 'none') |")
        return "\n".join(lines) + "\n"
    book, leak = tok["codebook"], tok["speaker_leakage"]
    lines += [
        f"| codes used | {100 * book['used_fraction']:.1f} % of {tok['codebook_size']} |",
        f"| code entropy | {book['entropy_bits']:.2f} bits (perplexity {book['perplexity']:.0f}) |",
        f"| tokens per second | {tok['per_second']:.2f} |",
        f"| real-time factor | {tok['real_time_factor']:.4f} |",
    ]
    if leak["tokens"] is None:
        lines.append("| speaker leakage | n/a (no speaker has 2 or more utterances) |")
    else:
        lines += [f"| speaker accuracy from tokens | {100 * leak['tokens']['accuracy']:.1f} % "
                  f"(chance {100 * leak['tokens']['chance']:.1f} %, {leak['tokens']['speakers']} speakers) |",
                  f"| speaker accuracy from log-mel | {100 * leak['log_mel']['accuracy']:.1f} % |"]
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="Kaldi data dir (dev or test set)")
    parser.add_argument("--tokenizer", required=True,
                        help="cosy checkpoint (.safetensors with config.yaml beside it) or ONNX file")
    parser.add_argument("--out", default=None, help="output prefix for .json and .md (default DATA/tokenizer_eval)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--codebook-size", type=int, default=None,
                        help="codes of an ONNX tokenizer (default 4096 at 50 Hz, 6561 at 25 Hz)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    backend = load_tokenizer(args.tokenizer, args.device)
    if isinstance(backend, OnnxBackend):
        log.info("ONNX tokenizer: no ASR head, WER/CER are not reported")
    prefix = report_prefix(args.out, Path(args.data) / "tokenizer_eval")
    report = evaluate(args.data, backend, args.batch_size, args.num_workers, args.codebook_size)
    report["tokenizer"] = str(args.tokenizer)
    markdown = format_markdown(report)
    write_report(prefix, report, markdown)
    print(markdown, end="")
    return 0
