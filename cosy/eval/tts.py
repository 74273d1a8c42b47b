"""`cosy eval tts`: score synthesised speech with independent judges.

A hypothesis dir holds `<utt>.wav` for utterances of a data dir and, optionally, a table
`utt2prompt` (`<utt> <prompt utt>`) naming the data-dir utterance used as each prompt.
The same metrics are computed on the data dir's own recordings of those utterances, the
reference line a system should approach:

* WER of an independent ASR (pocketsphinx, or a local Whisper dir) with jiwer, after
  `cosy.eval.asr.normalise_for_wer`;
* speaker similarity of each output to its prompt: cosine of resemblyzer embeddings
  (independent judge) and, with `--speaker`, of cosy's own speaker model;
* speaker identification: share of outputs closer to their own speaker's centroid (built
  from the data dir's other recordings of that speaker) than to any other speaker's;
  and, per speaker, whether their outputs are on average closer to their own speaker than
  to any other (the share of speakers for whom that holds);
* DNSMOS overall quality (speechmos).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from cosy.audio import load_audio
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError
from cosy.eval.asr import load_recogniser, word_error_rate
from cosy.eval.mos import dnsmos
from cosy.eval.report import report_prefix, write_report
from cosy.eval.speaker import (Embedder, embed_or_none, speaker_embedders, speaker_identification,
                               speaker_identification_of_means)

log = logging.getLogger(__name__)


def read_hypotheses(hyp_dir: Path, data: DataDir) -> tuple[dict[str, Path], dict[str, str]]:
    """(utt -> wav path, utt -> prompt utt) for the hypothesis dir."""
    if not hyp_dir.is_dir():
        raise CosyError(f"hypothesis dir not found: {hyp_dir}")
    wavs = {p.stem: p for p in sorted(hyp_dir.glob("*.wav")) if p.stem in data.wav}
    if not wavs:
        raise CosyError(f"{hyp_dir} has no <utt>.wav for any utterance of {data.path}")
    prompts: dict[str, str] = {}
    table = hyp_dir / "utt2prompt"
    if table.is_file():
        for number, line in enumerate(table.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in data.wav:
                raise CosyError(f"{table}:{number}: expected '<utt> <prompt utt of {data.path}>'")
            prompts[parts[0]] = parts[1]
    return wavs, prompts


def score_system(utts: list[str], get_audio: Callable[[str], tuple[np.ndarray, int]], data: DataDir,
                 prompts: dict[str, str], asr, embedders: dict[str, Embedder],
                 reference: dict[str, dict[str, np.ndarray]], mos: bool) -> dict:
    texts, vectors, quality = [], {name: {} for name in embedders}, []
    # the vector of an output that resembles no one (missing, or no speech found in it)
    nobody = {name: np.zeros_like(next(iter(reference[name].values()))) for name in embedders}
    for utt in tqdm(utts, desc="scoring", unit="utt", disable=None):
        try:
            samples, rate = get_audio(utt)
        except CosyError as err:  # a missing output is scored as silence: every word lost, nobody's voice
            log.warning("utterance %s: %s; scored as an empty output", utt, err)
            texts.append("")
            for name in embedders:
                vectors[name][utt] = nobody[name]
            continue
        texts.append(asr.transcribe(samples, rate))
        for name, embed in embedders.items():
            vector = embed_or_none(embed, samples, rate, utt)
            vectors[name][utt] = nobody[name] if vector is None else vector
        if mos:
            quality.append(dnsmos(samples, rate)["ovrl"])
    out = {"wer": word_error_rate([data.text[u] for u in utts], texts), "hypotheses": dict(zip(utts, texts))}
    if mos:
        out["dnsmos_ovrl"] = float(np.mean(quality)) if quality else float("nan")
    for name in embedders:
        if prompts:
            out[f"sim_{name}"] = float(np.mean([vectors[name][u] @ reference[name][prompts[u]]
                                                for u in utts if prompts.get(u) in reference[name]]))
        out[f"spk_id_{name}"] = speaker_identification(data, vectors[name], reference[name], prompts)
        out[f"spk_mean_id_{name}"] = speaker_identification_of_means(data, vectors[name], reference[name])
    return out


def evaluate(hyp_dir: str | Path, data_dir: str | Path, speaker_model: str | None = None,
             whisper_dir: str | None = None, mos: bool = True) -> dict:
    data = DataDir.load(data_dir)
    hyps, prompts = read_hypotheses(Path(hyp_dir), data)
    utts = sorted(hyps)
    asr = load_recogniser(whisper_dir)
    embedders = speaker_embedders(speaker_model)
    reference: dict[str, dict[str, np.ndarray]] = {name: {} for name in embedders}
    for utt in tqdm(data.utts, desc="reference speakers", unit="utt", disable=None):
        try:
            samples, rate = load_audio(data.wav[utt])
            vectors = {name: embed(samples, rate) for name, embed in embedders.items()}
        except CosyError as err:
            log.warning("reference utterance %s left out of the speaker centroids: %s", utt, err)
            continue
        for name, vector in vectors.items():
            reference[name][utt] = vector
    common = (data, prompts, asr, embedders, reference, mos)
    return {
        "num_utts": len(utts),
        "asr": asr.name,
        "ground_truth": score_system(utts, lambda u: load_audio(data.wav[u]), *common),
        "synthesised": score_system(utts, lambda u: load_audio(hyps[u]), *common),
    }


METRICS = [("wer", "WER (%)", 100.0), ("sim_resemblyzer", "SIM resemblyzer", 1.0), ("sim_cosy", "SIM cosy", 1.0),
           ("spk_id_resemblyzer", "speaker ID resemblyzer (%)", 100.0), ("spk_id_cosy", "speaker ID cosy (%)", 100.0),
           ("spk_mean_id_resemblyzer", "speakers closest to own voice on average, resemblyzer (%)", 100.0),
           ("dnsmos_ovrl", "DNSMOS OVRL", 1.0)]


def format_table(report: dict) -> str:
    rows = [m for m in METRICS if m[0] in report["synthesised"]]
    lines = [f"Independent ASR: {report['asr']}; {report['num_utts']} utterances.", "",
             "| system | " + " | ".join(label for _, label, _ in rows) + " |",
             "| --- |" + " ---: |" * len(rows)]
    for system in ("ground_truth", "synthesised"):
        values = report[system]
        lines.append(f"| {system.replace('_', ' ')} | "
                     + " | ".join(f"{values[key] * scale:.2f}" for key, _, scale in rows) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hyp-dir", required=True, help="folder of <utt>.wav (+ optional utt2prompt)")
    parser.add_argument("--data", required=True, help="Kaldi data dir with the reference text and recordings")
    parser.add_argument("--speaker", help="cosy speaker model (checkpoint or ONNX) for a second similarity")
    parser.add_argument("--whisper-dir", help="local Hugging Face Whisper dir to use as the ASR")
    parser.add_argument("--no-mos", action="store_true", help="skip DNSMOS (the slowest judge)")
    parser.add_argument("--out", help="report prefix (default: HYP_DIR/eval -> eval.md, eval.json)")


def run(args: argparse.Namespace) -> int:
    prefix = report_prefix(args.out, Path(args.hyp_dir) / "eval")
    report = evaluate(args.hyp_dir, args.data, args.speaker, args.whisper_dir, mos=not args.no_mos)
    table = format_table(report)
    write_report(prefix, report, table)
    print(table)
    return 0
