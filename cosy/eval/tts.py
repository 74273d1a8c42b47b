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

The speaker metrics are also given by speaker, with the speaker of the data dir whose
recordings each one's outputs resemble most on average.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cosy.audio import load_audio
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError
from cosy.eval.asr import load_recogniser, recogniser_name, word_error_rate
from cosy.eval.mos import dnsmos
from cosy.eval.report import report_prefix, write_report
from cosy.eval.speaker import (identified_utterances, nearest_speakers_of_means, speaker_embedders,
                               speaker_judge_names)

log = logging.getLogger(__name__)


def read_hypotheses(hyp_dir: Path, data: DataDir) -> tuple[dict[str, Path], dict[str, str]]:
    """(utt -> wav path, utt -> prompt utt) for the hypothesis dir."""
    if not hyp_dir.is_dir():
        raise CosyError(f"hypothesis dir not found: {hyp_dir}")
    found = {p.stem: p for p in sorted(hyp_dir.glob("*.wav"))}
    wavs = {utt: path for utt, path in found.items() if utt in data.wav}
    if not wavs:
        raise CosyError(f"{hyp_dir} has no <utt>.wav for any utterance of {data.path}")
    if len(wavs) < len(found):
        log.warning("%d wav(s) in %s name no utterance of %s and are not scored, e.g. %s", len(found) - len(wavs),
                    hyp_dir, data.path, next(u for u in found if u not in wavs))
    if len(wavs) < len(data.wav):
        log.warning("%d utterance(s) of %s have no output in %s; both lines are scored without them",
                    len(data.wav) - len(wavs), data.path, hyp_dir)
    prompts: dict[str, str] = {}
    table = hyp_dir / "utt2prompt"
    if table.is_file():
        for number, line in enumerate(table.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) != 2 or parts[0] not in data.wav or parts[1] not in data.wav:
                raise CosyError(f"{table}:{number}: expected '<utt of {data.path}> <its prompt utt>'")
            prompts[parts[0]] = parts[1]
    return wavs, prompts


@dataclass
class Judged:
    """What the judges made of one wav."""

    text: str = ""
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # judges that found no speech are absent
    mos: float | None = None
    problems: list[str] = field(default_factory=list)  # an unreadable wav, a judge that heard no speech


class Judges:
    """The independent judges, loaded once per process."""

    def __init__(self, speaker_model: str | None = None, whisper_dir: str | None = None,
                 with_mos: bool = True) -> None:
        self.asr = load_recogniser(whisper_dir)
        self.embedders = speaker_embedders(speaker_model)
        self.with_mos = with_mos

    def judge(self, path: str | Path, listen: bool) -> Judged:
        """Speaker vectors of the wav; with `listen`, also its transcript and DNSMOS."""
        try:
            samples, rate = load_audio(path)
        except CosyError as err:
            return Judged(problems=[str(err)])
        judged = Judged()
        for name, embed in self.embedders.items():
            try:
                judged.vectors[name] = embed(samples, rate)
            except CosyError as err:
                judged.problems.append(str(err))
        if listen:
            judged.text = self.asr.transcribe(samples, rate)
            if self.with_mos:
                judged.mos = dnsmos(samples, rate)["ovrl"]
        return judged


_worker_judges: Judges | CosyError | None = None


def _start_worker(make_judges: Callable[[], Judges]) -> None:
    global _worker_judges
    import torch

    # one process per core: a second torch thread in each would only contend
    torch.set_num_threads(1)
    try:
        _worker_judges = make_judges()
    except CosyError as err:
        # Raised here it would only kill the worker, and the pool would start another
        # forever; kept, it reaches the caller with the first result.
        _worker_judges = err


def _judge_in_worker(path: str, listen: bool) -> Judged:
    if isinstance(_worker_judges, CosyError):
        raise _worker_judges
    return _worker_judges.judge(path, listen)


def judge_all(tasks: list[tuple[str, bool]], make_judges: Callable[[], Judges], num_jobs: int) -> list[Judged]:
    """`make_judges().judge(path, listen)` for each task, in order, in up to `num_jobs` processes."""
    progress = partial(tqdm, total=len(tasks), desc="judging", unit="wav", disable=None)
    num_jobs = min(num_jobs, len(tasks))
    if num_jobs <= 1:
        judges = make_judges()
        return [judges.judge(*task) for task in progress(tasks)]
    with ProcessPoolExecutor(num_jobs, get_context("spawn"), _start_worker, (make_judges,)) as pool:
        return list(progress(pool.map(_judge_in_worker, *zip(*tasks), chunksize=4)))


def score_system(utts: list[str], judged: dict[str, Judged], data: DataDir, prompts: dict[str, str],
                 reference: dict[str, dict[str, np.ndarray]], mos: bool) -> dict:
    """The metrics of one system from what the judges made of its wav for each of `utts`;
    under "per_speaker", the speaker metrics of each speaker's outputs."""
    # the vector of an output that resembles no one (unreadable, or no speech found in it)
    nobody = {name: np.zeros_like(next(iter(vectors.values()))) for name, vectors in reference.items()}
    texts = [judged[u].text for u in utts]
    out = {"wer": word_error_rate([data.text[u] for u in utts], texts), "hypotheses": dict(zip(utts, texts))}
    if mos:
        out["dnsmos_ovrl"] = _mean(judged[u].mos for u in utts if judged[u].mos is not None)
    speakers: dict[str, list[str]] = {}
    for utt in utts:
        speakers.setdefault(data.utt2spk[utt], []).append(utt)
    per_speaker = {spk: {"utterances": len(members)} for spk, members in speakers.items()}
    for name in reference:
        vectors = {u: judged[u].vectors.get(name, nobody[name]) for u in utts}
        similarity = {u: float(vectors[u] @ reference[name][prompts[u]])
                      for u in utts if prompts.get(u) in reference[name]}
        identified = identified_utterances(data, vectors, reference[name], prompts)
        closest = nearest_speakers_of_means(data, vectors, reference[name])
        if prompts:
            out[f"sim_{name}"] = _mean(similarity.values())
        out[f"spk_id_{name}"] = _mean(identified.values())
        out[f"spk_mean_id_{name}"] = _mean(spk == near for spk, near in closest.items())
        for spk, members in speakers.items():
            row = per_speaker[spk]
            if prompts:
                row[f"sim_{name}"] = _mean(similarity[u] for u in members if u in similarity)
            row[f"spk_id_{name}"] = _mean(identified[u] for u in members)
            row[f"closest_{name}"] = closest[spk]
    out["per_speaker"] = per_speaker
    return out


def _mean(values) -> float:
    """NaN for no values (no DNSMOS score, a speaker without a usable prompt), without
    numpy's warning."""
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def evaluate(hyp_dir: str | Path, data_dir: str | Path, speaker_model: str | None = None,
             whisper_dir: str | None = None, mos: bool = True, num_jobs: int = 1) -> dict:
    if num_jobs < 1:
        raise CosyError(f"--num-jobs must be at least 1, got {num_jobs}")
    data = DataDir.load(data_dir)
    hyps, prompts = read_hypotheses(Path(hyp_dir), data)
    utts = sorted(hyps)
    # Every recording is embedded once: for the speaker centroids and, where it is one of
    # the scored utterances, as the ground-truth system's output.
    tasks = [(str(data.wav[u]), u in hyps) for u in data.utts] + [(str(hyps[u]), True) for u in utts]
    make_judges = partial(Judges, speaker_model=speaker_model, whisper_dir=whisper_dir, with_mos=mos)
    results = judge_all(tasks, make_judges, num_jobs)
    recordings = dict(zip(data.utts, results))
    outputs = dict(zip(utts, results[len(data.utts):]))
    _log_problems(recordings, outputs, mos)
    reference = {name: {u: j.vectors[name] for u, j in recordings.items() if name in j.vectors}
                 for name in speaker_judge_names(speaker_model)}
    for name, vectors in reference.items():
        if not vectors:
            raise CosyError(f"no recording of {data.path} is usable by the {name} judge "
                            "(unreadable, or no speech found)")
    return {
        "num_utts": len(utts),
        "asr": recogniser_name(whisper_dir),
        "ground_truth": score_system(utts, recordings, data, prompts, reference, mos),
        "synthesised": score_system(utts, outputs, data, prompts, reference, mos),
    }


def _log_problems(recordings: dict[str, Judged], outputs: dict[str, Judged], mos: bool) -> None:
    """Warn of each wav a judge could not use, and of what the scores make of it: a judge
    without a vector or a transcript treats the wav as empty (no words, nobody's voice)."""
    for utt, judged in recordings.items():
        scored = " and the ground-truth line scores it as empty" if utt in outputs else ""
        for problem in judged.problems:
            log.warning("recording %s: %s; left out of the speaker centroids%s", utt, problem, scored)
    for utt, judged in outputs.items():
        for problem in judged.problems:
            log.warning("output %s: %s; scored as empty%s", utt, problem,
                        " and left out of the DNSMOS mean" if mos and judged.mos is None else "")


METRICS = [("wer", "WER (%)", 100.0), ("sim_resemblyzer", "SIM resemblyzer", 1.0), ("sim_cosy", "SIM cosy", 1.0),
           ("spk_id_resemblyzer", "speaker ID resemblyzer (%)", 100.0), ("spk_id_cosy", "speaker ID cosy (%)", 100.0),
           ("spk_mean_id_resemblyzer", "speakers closest to own voice on average, resemblyzer (%)", 100.0),
           ("spk_mean_id_cosy", "speakers closest to own voice on average, cosy (%)", 100.0),
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
    return "\n".join(lines) + "\n\n" + format_per_speaker(report["synthesised"]["per_speaker"])


# per-speaker columns: key prefix -> (label, scale); the rest of the key, a judge's name, completes the label
PER_SPEAKER_COLUMNS = {"sim_": ("SIM {}", 1.0), "spk_id_": ("speaker ID {} (%)", 100.0),
                       "closest_": ("closest on average, {}", None)}


def format_per_speaker(per_speaker: dict[str, dict]) -> str:
    """The synthesised system's speaker metrics by speaker; "closest on average" names the
    speaker of the data dir whose recordings a speaker's outputs resemble most on average
    (their own name where the voice is kept). `per_speaker` is never empty: `evaluate`
    refuses a hypothesis dir without outputs."""
    columns = []  # (key, label, scale; None for a speaker's name)
    for key in next(iter(per_speaker.values())):
        for prefix, (label, scale) in PER_SPEAKER_COLUMNS.items():
            if key.startswith(prefix):
                columns.append((key, label.format(key[len(prefix):]), scale))
    lines = ["Synthesised, by speaker:", "",
             "| speaker | utterances | " + " | ".join(label for _, label, _ in columns) + " |",
             "| --- | ---: |" + "".join(" --- |" if scale is None else " ---: |" for _, _, scale in columns)]
    for spk, row in per_speaker.items():
        cells = [str(row[key] or "nobody") if scale is None else f"{row[key] * scale:.2f}"
                 for key, _, scale in columns]
        lines.append(f"| {spk} | {row['utterances']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hyp-dir", required=True, help="folder of <utt>.wav (+ optional utt2prompt)")
    parser.add_argument("--data", required=True, help="Kaldi data dir with the reference text and recordings")
    parser.add_argument("--speaker", help="cosy speaker model (checkpoint or ONNX) for a second similarity")
    parser.add_argument("--whisper-dir", help="local Hugging Face Whisper dir to use as the ASR")
    parser.add_argument("--no-mos", action="store_true", help="skip DNSMOS (the slowest judge)")
    parser.add_argument("--num-jobs", type=int, default=1,
                        help="judge the wavs in this many processes (at most one per core)")
    parser.add_argument("--out", help="report prefix (default: HYP_DIR/eval -> eval.md, eval.json)")


def run(args: argparse.Namespace) -> int:
    prefix = report_prefix(args.out, Path(args.hyp_dir) / "eval")
    report = evaluate(args.hyp_dir, args.data, args.speaker, args.whisper_dir, mos=not args.no_mos,
                      num_jobs=args.num_jobs)
    table = format_table(report)
    write_report(prefix, report, table)
    print(table)
    return 0
