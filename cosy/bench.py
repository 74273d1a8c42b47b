"""`cosy bench`: speed of zero-shot synthesis on this machine.

    cosy bench [--model-dir DIR | --config tiny|v1] [--steps 10] [--threads N] [--device cuda] [--json FILE]

Measures, for one sentence and a 3 s synthetic prompt: the real-time factor of offline
synthesis (wall time / audio duration), the first-chunk latency and RTF of streaming,
LM tokens per second, and the peak resident memory of the process (on CUDA also the
peak GPU memory); every time is given as wall time and as this process's CPU time
(see `Clock`). A named config
builds every part with random weights (`tiny`: the test-sized system; `v1`: the
published CosyVoice-300M sizes), so the LM's output length is arbitrary: the figures
are per second of whatever it produced. Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from cosy import config as cfgio
from cosy.errors import CosyError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."

_NO_DROPOUT = {"dropout": 0.0, "positional_dropout": 0.0}

# Every part of a system small enough for unit tests; sizes agree across parts
# (64 speech codes at 50 tokens/s, 64-dim speaker embeddings, the v1 mel).
TINY = {
    "tokenizer": {
        "vocab_size": 300,
        "encoder1": {"input_size": 128, "d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 1,
                     "input_layer": "conv2d2", "pos_enc": "rotary", **_NO_DROPOUT},
        "encoder2": {"input_size": 32, "d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 1,
                     "input_layer": "none", "pos_enc": "rotary", **_NO_DROPOUT},
        "decoder": {"n_layers": 0},
        "att_weight": 0.0,
        "quantizer": {"kind": "fsq", "levels": [4, 4, 4]},
    },
    "speaker": {
        "architecture": "campplus",
        "campplus": {"feat_dim": 80, "embedding_dim": 64, "fcm_channels": 8, "fcm_blocks": [1, 1],
                     "init_channels": 32, "growth_rate": 8, "bottleneck_scale": 2, "block_layers": [1, 1],
                     "block_kernels": [3, 3], "block_dilations": [1, 2], "cam_reduction": 2},
    },
    "llm": {
        "text_vocab": 512, "text_embed_dim": 32, "speech_vocab": 64, "spk_embed_dim": 64, "max_text_len": 128,
        "text_encoder": {"input_size": 32, "d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 1,
                         "input_layer": "linear", "pos_enc": "rel_pos", "layer": "conformer", "causal": True,
                         **_NO_DROPOUT},
        "lm": {"input_size": 32, "d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 2,
               "input_layer": "linear_legacy", "pos_enc": "rel_pos", "layer": "transformer", "causal": True,
               "max_len": 1024, **_NO_DROPOUT},
        "min_token_text_ratio": 2.0, "max_token_text_ratio": 6.0,
    },
    "flow": {
        "vocab_size": 64, "spk_dim": 64,
        "encoder": {"input_size": 32, "d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 1,
                    "layer": "conformer", "pos_enc": "rel_pos", "input_layer": "linear", **_NO_DROPOUT},
        "regulator_convs": 1,
        "estimator": {"channels": [32], "n_blocks": 1, "n_mid_blocks": 1, "heads": 2, "head_dim": 16, "groups": 8},
        "cfm": {"steps": 10},
    },
    "vocoder": {
        "generator": {"base_channels": 32, "upsample_rates": [8, 8], "upsample_kernels": [16, 16],
                      "resblock_kernels": [3], "resblock_dilations": [[1, 3]], "activation": "snake",
                      "istft_n_fft": 16, "istft_hop": 4,
                      "source": {"harmonics": 8, "f0_channels": 16, "f0_layers": 1, "resblock_kernels": [7, 11],
                                 "resblock_dilations": [[1, 3], [1, 3]]}},
    },
}

V1_FILES = {"llm": "llm_v1.yaml", "flow": "flow_v1.yaml", "vocoder": "hift_v1.yaml", "speaker": "speaker_campplus.yaml"}


def system_config(name: str) -> dict[str, dict]:
    """The `model:` section of every part of named system `name` (tiny or v1)."""
    if name == "tiny":
        return {part: dict(section) for part, section in TINY.items()}
    if name == "v1":
        out = {"tokenizer": {"vocab_size": 4096, "quantizer": {"kind": "vq", "codebook_size": 4096}}}
        for part, file in V1_FILES.items():
            out[part] = cfgio.load_yaml(RECIPES / "libritts" / "conf" / file)["model"]
        return out
    raise CosyError(f"--config must be tiny or v1, got {name!r}")


def _build(part: str, model: dict):
    """A randomly initialised inference module of `part` from its `model:` section."""
    from cosy.train.tasks import get_task

    task = get_task(part)
    cfg = cfgio.from_dict(task.config_cls, model, "model")
    if part == "speaker":
        from cosy.speaker.model import build_encoder

        return build_encoder(cfg)
    if part == "vocoder":
        from cosy.vocoder.hifigan import Generator

        return Generator(cfg.generator, cfg.mel)
    return task.build(cfg)


def write_text_tokenizer(path: str | Path, vocab_size: int = 300) -> Path:
    """A small BPE tokenizer.json trained on a few English sentences."""
    from cosy.text.bpe import TextTokenizer

    path = Path(path)
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join([TEXT, "A prompt recording says hello to everyone in the room.",
                                 "Numbers like one two three four five six seven eight nine ten."] * 20) + "\n")
    TextTokenizer.train([corpus], vocab_size=vocab_size, min_frequency=1).save(path)
    corpus.unlink()
    return path


def write_random_experiments(root: str | Path, name: str = "tiny", seed: int = 0,
                             overrides: dict[str, dict] | None = None,
                             parts: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Experiment dirs root/<part> (config.yaml + model.safetensors) with random weights,
    ready for `cosy pack`, for every part or only `parts`. `overrides` replaces keys of a
    part's `model:` section."""
    import torch

    from cosy.train.checkpoint import save_weights

    root = Path(root)
    torch.manual_seed(seed)
    dirs = {}
    for part, model in system_config(name).items():
        if parts is not None and part not in parts:
            continue
        model = {**model, **(overrides or {}).get(part, {})}
        folder = root / part
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"task": part, "model": model}, sort_keys=False))
        save_weights(folder / "model.safetensors", _build(part, model).state_dict())
        dirs[part] = folder
    return dirs


class Clock:
    """Wall time and this process's CPU time since creation. On a shared machine wall time
    depends on the load; with one torch thread, CPU time is what an idle core would take.
    CUDA work is waited for before each reading, since kernels run asynchronously."""

    def __init__(self):
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    @staticmethod
    def _sync():
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def read(self) -> tuple[float, float]:
        self._sync()
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def measure(tts, prompt: tuple[np.ndarray, int], text: str = TEXT) -> dict[str, float]:
    """Offline and streaming figures of `tts` speaking `text` with `prompt`."""
    tts.synthesize("Hello there, how are you?", prompt, seed=0)  # warm-up
    clock = Clock()
    wave, rate = tts.synthesize(text, prompt, seed=0)
    offline, offline_cpu = clock.read()
    seconds = len(wave) / rate
    prepared = tts.prompt(prompt)
    sentences = tts.sentences(text)
    clock = Clock()
    tokens = tts.generate_tokens(sentences, [prepared] * len(sentences), seed=0)
    lm, lm_cpu = clock.read()
    clock, first, samples = Clock(), None, 0
    for chunk in tts.stream(text, prompt, seed=0):
        if first is None and len(chunk):
            first = clock.read()
        samples += len(chunk)
    streaming, streaming_cpu = clock.read()
    first = first or (float("nan"), float("nan"))
    n_tokens = sum(len(t) for t in tokens)
    import torch

    gpu = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_initialized() else {}
    return {
        "audio_seconds": seconds,
        "rtf": offline / seconds,
        "rtf_cpu": offline_cpu / seconds,
        "stream_first_chunk_seconds": first[0],
        "stream_first_chunk_cpu_seconds": first[1],
        "stream_rtf": streaming / max(samples / rate, 1e-9),
        "stream_rtf_cpu": streaming_cpu / max(samples / rate, 1e-9),
        "lm_tokens": n_tokens,
        "lm_tokens_per_second": n_tokens / lm,
        "lm_tokens_per_cpu_second": n_tokens / lm_cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **gpu,
    }


def synthetic_prompt(seconds: float = 3.0, rate: int = 16000) -> tuple[np.ndarray, int]:
    """A voiced-sounding test signal: a gliding harmonic tone, syllable-rate envelope, noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * envelope * voiced + 0.01 * rng.standard_normal(len(t))).astype(np.float32), rate


def random_tts(name: str, steps: int | None = None, device: str = "cpu"):
    """A CosyTTS of named system `name` with random weights (packed in a temporary dir)."""
    from cosy.inference.model_dir import pack
    from cosy.inference.pipeline import CosyTTS

    overrides = {"flow": {"cfm": {**system_config(name)["flow"].get("cfm", {}), "steps": steps}}} if steps else None
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_random_experiments(Path(tmp) / "exp", name, overrides=overrides)
        tokenizer = write_text_tokenizer(Path(tmp) / "tokenizer.json")
        return CosyTTS.from_pretrained(pack(dirs, tokenizer, Path(tmp) / "model"), device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-dir", help="a model dir made by `cosy pack`")
    source.add_argument("--config", choices=["tiny", "v1"], default="tiny",
                        help="a named system with random weights (default: tiny)")
    parser.add_argument("--steps", type=int, help="flow solver steps (default: the model dir's, or the config's 10)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device to synthesise on (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--json", help="also write the JSON result to this file")


def run(args: argparse.Namespace) -> int:
    import torch

    from cosy.inference.pipeline import CosyTTS

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model_dir or args.config
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CosyError(f"--device {args.device}: this torch sees no CUDA device")
    if args.steps is not None and args.steps < 1:
        raise CosyError(f"--steps must be at least 1, got {args.steps}")
    tts = (CosyTTS.from_pretrained(args.model_dir, args.device) if args.model_dir
           else random_tts(args.config, args.steps, args.device))
    if args.model_dir and args.steps:
        tts.set_flow_steps(args.steps)
    result = {"system": name, "device": args.device, "threads": torch.get_num_threads(),
              "flow_steps": tts.parts.flow.cfg.cfm.steps, **measure(tts, synthetic_prompt())}
    rows = [("audio generated", f"{result['audio_seconds']:.2f} s"),
            ("offline RTF", f"{result['rtf']:.3f} (CPU {result['rtf_cpu']:.3f})"),
            ("streaming first chunk", f"{result['stream_first_chunk_seconds'] * 1000:.0f} ms "
                                      f"(CPU {result['stream_first_chunk_cpu_seconds'] * 1000:.0f} ms)"),
            ("streaming RTF", f"{result['stream_rtf']:.3f} (CPU {result['stream_rtf_cpu']:.3f})"),
            ("LM tokens/s", f"{result['lm_tokens_per_second']:.1f} (CPU {result['lm_tokens_per_cpu_second']:.1f}; "
                            f"{result['lm_tokens']} tokens)"),
            ("peak memory (RSS)", f"{result['peak_rss_mb']:.0f} MB")]
    if "peak_gpu_mb" in result:
        rows.append(("peak GPU memory", f"{result['peak_gpu_mb']:.0f} MB"))
    print(f"cosy bench: {name} on {args.device}, {result['threads']} thread(s), {result['flow_steps']} flow steps")
    for label, value in rows:
        print(f"  {label:<24} {value}")
    text = json.dumps(result)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
