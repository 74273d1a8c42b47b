"""Speed of speech-token decoding: cached (preallocated KV cache) vs uncached (a full
forward over the whole sequence at every step), batch 1 and 8, tiny and v1 sizes, CPU.

Every row decodes exactly --tokens tokens (eos masked by setting min = max length) with
the default RAS sampler, after a text of --text-len random ids and an empty prompt. Random weights; FLOPs do not depend on
them.

Uncached decoding at the v1 size would take many minutes, so by default it is
*estimated*: one full-forward step is timed at --points sequence lengths spread over
the run and the per-step times are interpolated linearly over all steps. For the tiny
config the real uncached loop also runs, which shows how good the estimate is.

    python tools/bench_llm.py --config tiny
    python tools/bench_llm.py --config v1        # heavy: about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cosy import config
from cosy.llm import LLM, LLMConfig
from cosy.llm.decode import stream

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": ROOT / "recipes/mini/conf/llm_tiny.yaml", "v1": ROOT / "recipes/libritts/conf/llm_v1.yaml"}


def build(name: str, tokens: int, text_len: int) -> LLM:
    cfg = config.from_dict(LLMConfig, config.load_yaml(CONFIGS[name])["model"], "model")
    cfg.min_token_text_ratio = cfg.max_token_text_ratio = tokens / text_len
    torch.manual_seed(0)
    return LLM(cfg).eval()


def make_inputs(model: LLM, batch: int, text_len: int):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, model.cfg.text_vocab, (batch, text_len), generator=g)
    embedding = torch.randn(batch, model.cfg.spk_embed_dim, generator=g)
    return text, torch.full((batch,), text_len), embedding


def decode(model: LLM, batch: int, text_len: int, use_cache: bool) -> tuple[float, float, int]:
    """-> (seconds to the first token, total seconds, tokens drawn)."""
    text, text_len_t, embedding = make_inputs(model, batch, text_len)
    start = time.perf_counter()
    first, count = None, 0
    for tokens in stream(model, text, text_len_t, embedding=embedding, seed=0, use_cache=use_cache):
        first = first or time.perf_counter() - start
        count += int((tokens >= 0).sum())
    return first, time.perf_counter() - start, count


@torch.no_grad()
def estimate_uncached(model: LLM, batch: int, text_len: int, tokens: int, points: int) -> float:
    """Seconds for `tokens` uncached steps, interpolated from `points` timed full passes."""
    text, text_len_t, embedding = make_inputs(model, batch, text_len)
    x, lengths = model.prepare(text, text_len_t, embedding=embedding)
    speech = model.speech_embedding(torch.randint(0, model.cfg.speech_vocab, (batch, tokens)))
    steps = np.linspace(0, tokens - 1, points).round().astype(int)
    seconds = []
    for k in steps:
        seq = torch.cat([x, speech[:, :k]], 1)
        start = time.perf_counter()
        model.head(model.hidden(seq, lengths + k)[:, -1])
        seconds.append(time.perf_counter() - start)
    return float(np.interp(np.arange(tokens), steps, seconds).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--text-len", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2-thread runs suffer badly on a loaded machine)")
    parser.add_argument("--points", type=int, default=3, help="sequence lengths timed for the uncached estimate")
    parser.add_argument("--full-uncached", action="store_true", help="run the real uncached loop (default: tiny only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.config, args.tokens, args.text_len)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"config {args.config} ({params:.1f} M parameters), {args.tokens} tokens per row, text {args.text_len} "
          f"ids, {args.threads} threads, torch {torch.__version__}")
    decode(model, 1, 1, True)  # warm-up: one text id, tokens/text_len tokens
    for batch in args.batch:
        first, total, count = decode(model, batch, args.text_len, True)
        assert count == batch * args.tokens, count
        cached = count / total
        line = (f"batch {batch}: cached   {cached:8.1f} tok/s ({1000 * total / args.tokens:6.1f} ms/step, "
                f"first token {1000 * first:.0f} ms, {total:.1f} s)")
        print(line, flush=True)
        estimate = estimate_uncached(model, batch, args.text_len, args.tokens, args.points)
        print(f"batch {batch}: uncached {count / estimate:8.1f} tok/s estimated from {args.points} full passes "
              f"({estimate:.1f} s) -> cached speed-up x{estimate / total:.1f}", flush=True)
        if args.full_uncached or args.config == "tiny":
            _, slow, slow_count = decode(model, batch, args.text_len, False)
            print(f"batch {batch}: uncached {slow_count / slow:8.1f} tok/s measured ({slow:.1f} s) "
                  f"-> cached speed-up x{slow / total:.1f}", flush=True)


if __name__ == "__main__":
    main()
