"""`cosy eval speaker`: equal error rate of a speaker encoder on trial pairs.

Every pair of utterances of a data dir is a trial (target when both share a speaker);
pairs never cross data dirs. Trials are scored by cosine similarity. With the
resemblyzer judge installed, it scores the same trials as a reference point.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from cosy.audio import load_audio
from cosy.errors import CosyError
from cosy.speaker import judge as judge_module
from cosy.speaker.extract import embed_utterances, load_speaker_encoder

log = logging.getLogger(__name__)


def _operating_points(target: np.ndarray, nontarget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-accept and false-reject rates for every threshold between distinct scores.

    Rates are ordered from the strictest threshold (accept nothing) to the loosest
    (accept everything); tied scores are never split.
    """
    if len(target) == 0 or len(nontarget) == 0:
        raise ValueError("need at least one target and one non-target score")
    scores = np.concatenate([target, nontarget])
    is_target = np.concatenate([np.ones(len(target)), np.zeros(len(nontarget))])
    order = np.argsort(-scores, kind="stable")
    scores, is_target = scores[order], is_target[order]
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(scores)) + 1, [len(scores)]])
    accepted_targets = np.concatenate([[0], np.cumsum(is_target)])[cuts]
    accepted_nontargets = cuts - accepted_targets
    return accepted_nontargets / len(nontarget), 1.0 - accepted_targets / len(target)


def equal_error_rate(target: np.ndarray, nontarget: np.ndarray) -> float:
    """The rate where false accepts equal false rejects, linearly interpolated between thresholds."""
    far, frr = _operating_points(np.asarray(target, float), np.asarray(nontarget, float))
    gap = far - frr  # rises from -1 (accept nothing) to +1 (accept everything)
    i = int(np.argmax(gap >= 0))
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def min_dcf(target: np.ndarray, nontarget: np.ndarray, p_target: float = 0.01,
            c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Minimum detection cost over thresholds, normalised by the cost of a trivial system."""
    far, frr = _operating_points(np.asarray(target, float), np.asarray(nontarget, float))
    cost = c_miss * p_target * frr + c_fa * (1 - p_target) * far
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def build_trials(num_utts: int, max_trials: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i > j, over `num_utts` items: all of them, or `max_trials` drawn at random."""
    total = num_utts * (num_utts - 1) // 2
    if total <= max_trials:
        k = np.arange(total, dtype=np.int64)
    else:
        k = np.sort(np.random.default_rng(seed).choice(total, max_trials, replace=False))
    # Pair number k enumerates the lower triangle row by row: k = i (i - 1) / 2 + j.
    i = ((1 + np.sqrt(1 + 8 * k.astype(np.float64))) // 2).astype(np.int64)
    return i, k - i * (i - 1) // 2


def score_trials(embeddings: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows i and j of `embeddings` (utterances, dim)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.einsum("nd,nd->n", unit[i], unit[j])


def _metrics(scores: np.ndarray, is_target: np.ndarray) -> dict[str, float]:
    return {"eer": equal_error_rate(scores[is_target], scores[~is_target]),
            "min_dcf": min_dcf(scores[is_target], scores[~is_target])}


def _judge_embeddings(judge, wav: dict[str, str], utts: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for utt in utts:
        try:
            samples, rate = load_audio(wav[utt])
            out[utt] = judge.embed(samples, rate)
        except CosyError as err:
            log.warning("judge skips utterance %s: %s", utt, err)
    return out


def evaluate(data_dirs: list[str], speaker_model: str, use_judge: bool = True, max_trials: int = 200_000,
             num_workers: int = 0, device: str = "cpu") -> dict:
    """EER and minDCF per data dir and over all trials pooled, for the model and the judge."""
    from cosy.data.kaldi import DataDir

    encoder = load_speaker_encoder(speaker_model, device)
    judge = judge_module.ResemblyzerJudge() if use_judge and judge_module.available() else None
    report: dict = {"speaker_model": str(speaker_model), "judge": "resemblyzer" if judge else None, "sets": {}}
    pooled: dict[str, list[np.ndarray]] = {"model": [], "judge": []} if judge else {"model": []}
    pooled_target: list[np.ndarray] = []
    for data_dir in data_dirs:
        data = DataDir.load(data_dir)
        embedded = embed_utterances(data.wav, encoder, num_workers)
        judged = _judge_embeddings(judge, data.wav, sorted(embedded)) if judge else {}
        utts = sorted(u for u in embedded if judge is None or u in judged)
        speakers = np.array([data.utt2spk[u] for u in utts])
        i, j = build_trials(len(utts), max_trials)
        is_target = speakers[i] == speakers[j]
        result = {"utterances": len(utts), "speakers": len(set(speakers)), "target_trials": int(is_target.sum()),
                  "nontarget_trials": int((~is_target).sum())}
        report["sets"][str(data_dir)] = result
        if len(i) == 0:
            continue
        scores = {"model": score_trials(np.stack([embedded[u] for u in utts]), i, j)}
        if judge:
            scores["judge"] = score_trials(np.stack([judged[u] for u in utts]), i, j)
        for who, values in scores.items():
            pooled[who].append(values)
        pooled_target.append(is_target)
        # A dev set with one utterance per speaker has no target trials: it only counts pooled.
        if is_target.any() and not is_target.all():
            result.update({who: _metrics(values, is_target) for who, values in scores.items()})
    is_target = np.concatenate(pooled_target) if pooled_target else np.zeros(0, bool)
    if is_target.all() or not is_target.any():
        raise CosyError(f"the trials of {', '.join(map(str, data_dirs))} need both target and non-target pairs: "
                        f"at least two speakers and one with two readable utterances")
    report["pooled"] = {who: _metrics(np.concatenate(values), is_target) for who, values in pooled.items()}
    return report


def format_report(report: dict) -> str:
    lines = []
    for name, result in list(report["sets"].items()) + [("pooled", report["pooled"])]:
        head = name if name == "pooled" else (f"{name}: {result['utterances']} utts, {result['speakers']} speakers, "
                                              f"{result['target_trials']} target / {result['nontarget_trials']} "
                                              f"non-target trials")
        lines.append(head)
        if "model" not in result:
            lines.append("  no EER of its own (needs target and non-target trials); counted in pooled")
        for who in ("model", "judge"):
            if who in result:
                label = "speaker model" if who == "model" else "resemblyzer"
                lines.append(f"  {label:<14} EER {100 * result[who]['eer']:6.2f}%  "
                             f"minDCF(0.01) {result[who]['min_dcf']:.4f}")
    if report["judge"] is None:
        lines.append(f"resemblyzer judge not used (disabled or not installed: {judge_module.INSTALL_HINT})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True,
                        help="data dir whose utterance pairs are trials (repeat for several)")
    parser.add_argument("--speaker", required=True, help="speaker model: cosy checkpoint or .onnx file")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--max-trials", type=int, default=200_000,
                        help="per data dir; beyond it pairs are sampled at random (default 200000)")
    parser.add_argument("--no-judge", action="store_true", help="skip the resemblyzer comparison")
    parser.add_argument("--num-workers", type=int, default=0, help="processes decoding audio (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device for a checkpoint (default cpu)")


def run(args: argparse.Namespace) -> int:
    if args.max_trials < 1:
        raise CosyError(f"--max-trials must be positive, got {args.max_trials}")
    report = evaluate(args.data, args.speaker, not args.no_judge, args.max_trials, args.num_workers, args.device)
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
