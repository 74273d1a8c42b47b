"""Flow decoder speed on CPU: real-time factor of 10-step inference, and streaming.

    python tools/bench_flow.py [--threads 2] [--repeats 1] [--skip-v1] [--skip-stream]

Wall time on a shared machine depends on the load, so each figure also gives the
process CPU time (with --threads 1 that is what an idle core would take).

Offline: 200 target tokens + a 50-token prompt with an 86-frame prompt mel (the
reference's v1 measurement: 344 output frames), random weights, for the tiny and the
v1-size config. RTF = wall time / duration of the generated mel.
Streaming: a causal v2-like config (25 tokens/s, 2 frames per token, chunks of 25
tokens, 3 look-ahead tokens, estimator channels [256], 12 mid blocks, 2 chunks of left
context) after a 50-token prompt, 300 tokens pushed 25 at a time (one chunk each);
prints the time of every push.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from cosy import config as cfgio
from cosy.audio import MelConfig
from cosy.flow.model import FlowConfig, FlowModel

ROOT = Path(__file__).resolve().parents[1]


def load(path: str) -> FlowConfig:
    return cfgio.from_dict(FlowConfig, cfgio.load_yaml(ROOT / path)["model"], "model")


def offline(name: str, cfg: FlowConfig, repeats: int) -> None:
    torch.manual_seed(0)
    model = FlowModel(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 200))
    prompt = torch.randint(0, cfg.vocab_size, (1, 50))
    prompt_feat = torch.randn(1, cfg.n_mels, 86)
    emb = torch.randn(1, cfg.spk_dim)
    model.inference(tokens[:, :20], prompt, prompt_feat, emb)  # warm-up
    times, cpu = [], []
    for i in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        mel = model.inference(tokens, prompt, prompt_feat, emb, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    seconds = mel.shape[2] / cfg.frames_per_second
    median, median_cpu = statistics.median(times), statistics.median(cpu)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name:<6} {params:6.1f} M params  {mel.shape[2]} frames ({seconds:.2f} s)  wall median "
          f"{median:.2f} s (min {min(times):.2f}) RTF {median / seconds:.3f}  |  CPU {median_cpu:.2f} s "
          f"RTF {median_cpu / seconds:.3f}")


def streaming(v1: FlowConfig) -> None:
    cfg = dataclasses.replace(
        v1, token_rate=25.0, vocab_size=6561,
        mel=MelConfig.v2(),
        estimator=dataclasses.replace(v1.estimator, channels=[256]),
        causal=True, chunk_tokens=25, lookahead=3, left_chunks=2)
    torch.manual_seed(0)
    model = FlowModel(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 50))
    t0, c0 = time.perf_counter(), time.process_time()
    stream = model.stream(prompt, torch.randn(1, cfg.n_mels, 100), torch.randn(1, cfg.spk_dim))
    print(f"streaming (causal, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"chunk {cfg.chunk_tokens} tokens = {cfg.chunk_tokens * cfg.ratio} frames = "
          f"{cfg.chunk_tokens / cfg.token_rate:.1f} s, look-ahead {cfg.lookahead} tokens)")
    print(f"  start (prompt chunks: {stream.done // cfg.chunk_tokens}): wall {time.perf_counter() - t0:.2f} s  "
          f"CPU {time.process_time() - c0:.2f} s")
    tokens = torch.randint(0, cfg.vocab_size, (1, 300))
    for i, start in enumerate(range(0, 300, 25), start=1):
        t0, c0 = time.perf_counter(), time.process_time()
        mel = stream.push(tokens[:, start:start + 25])
        print(f"  push {i:2d}: {mel.shape[2]} frames out, wall {time.perf_counter() - t0:.2f} s  "
              f"CPU {time.process_time() - c0:.2f} s")
    t0, c0 = time.perf_counter(), time.process_time()
    mel = stream.finish()
    print(f"  finish: {mel.shape[2]} frames out, wall {time.perf_counter() - t0:.2f} s  "
          f"CPU {time.process_time() - c0:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-v1", action="store_true")
    parser.add_argument("--skip-stream", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    offline("tiny", load("recipes/mini/conf/flow_tiny.yaml"), args.repeats)
    v1 = load("recipes/libritts/conf/flow_v1.yaml")
    if not args.skip_v1:
        offline("v1", v1, args.repeats)
    if not args.skip_stream:
        streaming(v1)


if __name__ == "__main__":
    main()
