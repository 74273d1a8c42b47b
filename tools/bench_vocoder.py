"""Real-time factor of the vocoder generators on CPU (random weights; FLOPs do not depend on them).

RTF = wall time / duration of the audio produced; median of --runs timed runs after one
warm-up, batch 1, weight norm folded, under torch.inference_mode(). The HiFT v1 row is
comparable to the reference's 0.38 on a 345-frame mel (2 threads, idle machine). The
process CPU seconds of the median run are printed too: on a machine shared with other
jobs wall time inflates, CPU time much less so.

    python tools/bench_vocoder.py [--threads 2] [--runs 3] [--only hift_v1] [--onnx]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cosy.audio import MelConfig  # noqa: E402
from cosy.vocoder.cosyvoice import hift_config  # noqa: E402
from cosy.vocoder.hifigan import Generator, GeneratorConfig  # noqa: E402


def configs() -> dict[str, tuple[GeneratorConfig, MelConfig, int]]:
    """name -> (generator config, mel config, mel frames to vocode)."""
    v1 = GeneratorConfig()  # HiFi-GAN V1: 512 channels, rates 8 8 2 2
    v3 = GeneratorConfig(base_channels=256, upsample_rates=[8, 8, 4], upsample_kernels=[16, 16, 8],
                         resblock_kernels=[3, 5, 7], resblock_dilations=[[1, 2], [2, 6], [3, 12]])
    return {
        "hifigan_v1": (v1, MelConfig.v1(), 345),
        "hifigan_v3_like": (v3, MelConfig.v1(), 345),
        "hift_v1": (*hift_config(1), 345),
        "hift_v2": (*hift_config(2), 400),
    }


def time_call(fn, runs: int) -> tuple[list[float], float]:
    """Wall seconds of each run, and the process CPU seconds of the median one."""
    fn()
    runs_ = []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        runs_.append((time.perf_counter() - start, time.process_time() - cpu))
    return [w for w, _ in runs_], sorted(runs_)[len(runs_) // 2][1]


def row(name: str, params: float, frames: int, seconds: float, times: list[float], cpu: float) -> str:
    med = statistics.median(times)
    return (f"{name:<18}{params:>9.2f}{frames:>8}{seconds:>9.3f}{med:>10.3f}{med / seconds:>7.3f}{cpu:>8.2f}"
            f"  {min(times):.3f}-{max(times):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="config names to run")
    parser.add_argument("--onnx", action="store_true", help="also time the exported ONNX graph (onnxruntime)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} runs after 1 warm-up")
    print(f"{'config':<18}{'params M':>9}{'frames':>8}{'audio s':>9}{'median s':>10}{'RTF':>7}{'cpu s':>8}  range s")
    for name, (gen_cfg, mel, frames) in configs().items():
        if args.only and name not in args.only:
            continue
        gen = Generator(gen_cfg, mel).eval().remove_weight_norm()
        params = sum(p.numel() for p in gen.parameters()) / 1e6
        x = torch.randn(1, mel.n_mels, frames)
        seconds = frames * mel.hop_length / mel.sample_rate
        with torch.inference_mode():
            print(row(name, params, frames, seconds, *time_call(lambda: gen(x), args.runs)))
        if args.onnx:
            from cosy.vocoder.export import OnnxVocoder, export_onnx

            with tempfile.TemporaryDirectory() as tmp:
                export_onnx(gen, Path(tmp) / "v.onnx")
                runtime = OnnxVocoder(Path(tmp) / "v.onnx", threads=args.threads)
                print(row(name + " onnx", params, frames, seconds,
                          *time_call(lambda: runtime(x.numpy(), seed=0), args.runs)))


if __name__ == "__main__":
    main()
