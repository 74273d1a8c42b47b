"""`cosy extract tokens`: speech tokens of every utterance of a data dir.

    cosy extract tokens --data DIR --tokenizer MODEL [--batch-size B] [--num-workers W]

writes DIR/utt2speech_token.safetensors (one int32 1-D tensor per utterance id), which
`cosy data shards` picks up. MODEL is either a cosy checkpoint (`step_N.safetensors` or an
averaged `.safetensors`, with the experiment's `config.yaml` beside it or one folder up) or an ONNX
file with the released speech-tokenizer contract: input 0 float32 [B, 128, T] log-mel,
input 1 int32 [B] frame counts, output 0 integer tokens [B, ceil(T / r)], r = 2 or 4.

Audio longer than the tokenizer's limit (30 s) is cut into consecutive 30 s windows whose
tokens are concatenated; the windows do not see each other, so tokens right at a window
edge may differ from what a model without the limit would give. Unreadable, empty or
too-short audio is logged with its utterance id and skipped.

Under torchrun each rank tokenizes every WORLD_SIZE-th utterance and writes a part file;
rank 0 merges the parts once all ranks are done.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save as save_numpy
from torch.utils.data import DataLoader, Dataset

from cosy.audio import WhisperMelConfig, load_audio, whisper_log_mel
from cosy.checkpoint import load_weights, read_experiment
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError
from cosy.tokenizer.model import TRAINING_ONLY, TokenizerConfig, TokenizerModel
from cosy.train.checkpoint import atomic_write

log = logging.getLogger(__name__)

OUTPUT = "utt2speech_token.safetensors"


def load_checkpoint(path: str | Path, device: str = "cpu") -> TokenizerModel:
    """A trained TokenizerModel from `path` (safetensors weights, config.yaml beside it)."""
    cfg, state, config_path = read_experiment(path, "tokenizer", TokenizerConfig)
    # Built without the speaker adversary, which only served training: its speaker list
    # need not exist here.
    return load_weights(TokenizerModel(cfg), state, path, config_path, (TRAINING_ONLY,)).to(device).eval()


class TorchBackend:
    """Tokens from a cosy TokenizerModel."""

    def __init__(self, model: TokenizerModel):
        self.model = model
        self.mel = model.cfg.mel
        self.rate_factor = model.rate_factor
        self.max_frames = model.max_frames
        self.device = next(model.parameters()).device

    def tokenize(self, feats: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        tokens, _ = self.model.tokenize(feats.to(self.device), lengths.to(self.device))
        return tokens.cpu().numpy()


class OnnxBackend:
    """Tokens from an ONNX file with the released contract (inputs read by position)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:  # the plain onnxruntime wheel is CPU-only; say so once instead of ort's warning per session
                log.info("onnxruntime has no CUDA provider (install onnxruntime-gpu): %s runs on the CPU", path)
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise CosyError(f"cannot load ONNX tokenizer {path}: {err}") from err
        inputs = self.session.get_inputs()
        if len(inputs) < 2:
            raise CosyError(f"ONNX tokenizer {path} has {len(inputs)} input(s); expected log-mel and frame counts")
        self.names = [i.name for i in inputs[:2]]
        self.mel = WhisperMelConfig()
        self.max_frames = 3000
        self.rate_factor = self._probe_rate(path)

    def _probe_rate(self, path) -> int:
        """The model's subsampling factor, from the output length of a 40-frame input."""
        out = self.tokenize(torch.zeros(1, self.mel.n_mels, 40), torch.tensor([40]))
        if out.shape[1] not in (10, 20):
            raise CosyError(f"ONNX tokenizer {path}: 40 frames gave {out.shape[1]} tokens; expected 20 or 10")
        return 40 // out.shape[1]

    def tokenize(self, feats: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        feed = {self.names[0]: feats.float().numpy(), self.names[1]: lengths.numpy().astype(np.int32)}
        return self.session.run(None, feed)[0]


def load_tokenizer(path: str | Path, device: str = "cpu") -> TorchBackend | OnnxBackend:
    """A tokenizer backend for a cosy checkpoint or an ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise CosyError(f"--tokenizer: file not found: {path}")
    if path.suffix == ".onnx":
        return OnnxBackend(path, device)
    return TorchBackend(load_checkpoint(path, device))


@dataclass
class Features:
    """One utterance's log-mel (n_mels, frames), or why it has none."""

    utt: str
    feats: torch.Tensor | None
    error: str = ""


class FeatureDataset(Dataset):
    def __init__(self, wavs: dict[str, str], utts: list[str], mel: WhisperMelConfig):
        self.wavs, self.utts, self.mel = wavs, utts, mel

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, index: int) -> Features:
        utt = self.utts[index]
        try:
            samples, _ = load_audio(self.wavs[utt], self.mel.sample_rate)
            if len(samples) <= self.mel.n_fft // 2:
                return Features(utt, None, f"audio {self.wavs[utt]} is too short ({len(samples)} samples)")
            feats = whisper_log_mel(torch.from_numpy(samples)[None], self.mel)[0]
        except CosyError as err:
            return Features(utt, None, str(err))
        return Features(utt, feats)


def _as_is(item: Features) -> Features:
    return item


def iterate_features(wavs: dict[str, str], utts: list[str], mel: WhisperMelConfig,
                     num_workers: int = 0) -> Iterator[Features]:
    """Log-mel of each utterance, in order, computed by `num_workers` loader processes."""
    loader = DataLoader(FeatureDataset(wavs, utts, mel), batch_size=None, num_workers=num_workers,
                        collate_fn=_as_is)
    yield from loader


def map_windows(fn: Callable[[torch.Tensor, torch.Tensor], list[np.ndarray]], items: Iterable[Features],
                window: int, batch_size: int) -> Iterator[tuple[str, np.ndarray]]:
    """Apply `fn` to padded batches of at most `window`-frame pieces of each utterance.

    fn: (feats (batch, n_mels, frames), lengths (batch,)) -> one 1-D array per row.
    Yields (utt, the concatenation of its pieces' arrays) once all its pieces are done.
    """
    pending: list[tuple[str, int, int, torch.Tensor]] = []  # utt, piece index, piece count, feats
    done: dict[str, list[np.ndarray | None]] = {}

    def flush() -> Iterator[tuple[str, np.ndarray]]:
        lengths = torch.tensor([p[3].shape[1] for p in pending])
        feats = torch.zeros(len(pending), pending[0][3].shape[0], int(lengths.max()))
        for row, p in enumerate(pending):
            feats[row, :, :p[3].shape[1]] = p[3]
        for (utt, index, count, _), out in zip(pending, fn(feats, lengths)):
            parts = done.setdefault(utt, [None] * count)
            parts[index] = out
            if all(p is not None for p in parts):
                yield utt, np.concatenate(done.pop(utt))
        pending.clear()

    for item in items:
        count = math.ceil(item.feats.shape[1] / window)
        for index in range(count):
            pending.append((item.utt, index, count, item.feats[:, index * window:(index + 1) * window]))
            if len(pending) == batch_size:
                yield from flush()
    if pending:
        yield from flush()


def window_frames(backend) -> int:
    """Longest piece the backend takes, a multiple of its subsampling factor so that the
    pieces' token counts add up to ceil(frames / r)."""
    return backend.max_frames // backend.rate_factor * backend.rate_factor


def tokenize_stream(backend, items: Iterable[Features], batch_size: int) -> Iterator[tuple[str, np.ndarray]]:
    """(utt, int32 tokens) for every utterance of `items`."""
    def tokens(feats, lengths):
        out = backend.tokenize(feats, lengths)
        return [out[row, :math.ceil(int(n) / backend.rate_factor)].astype(np.int32)
                for row, n in enumerate(lengths)]

    return map_windows(tokens, items, window_frames(backend), batch_size)


def readable_features(data: DataDir, utts: list[str], mel: WhisperMelConfig, num_workers: int,
                      skipped: list[tuple[str, str]]) -> Iterator[Features]:
    """Features of `utts`; the unusable ones are logged and appended to `skipped`."""
    for item in iterate_features(data.wav, utts, mel, num_workers):
        if item.feats is None or item.feats.shape[1] == 0:
            reason = item.error or "no feature frames"
            log.warning("utterance %s: %s; skipped", item.utt, reason)
            skipped.append((item.utt, reason))
            continue
        yield item


def extract(data_dir: str | Path, backend, batch_size: int = 8, num_workers: int = 0,
            rank: int = 0, world_size: int = 1) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Tokens of this rank's share of the utterances of `data_dir`, and the skipped (utt, reason)."""
    if batch_size < 1:
        raise CosyError(f"--batch-size must be >= 1, got {batch_size}")
    data = DataDir.load(data_dir)
    skipped: list[tuple[str, str]] = []
    items = readable_features(data, data.utts[rank::world_size], backend.mel, num_workers, skipped)
    return dict(tokenize_stream(backend, items, batch_size)), skipped


def save_tokens(path: str | Path, tokens: dict[str, np.ndarray]) -> None:
    atomic_write(path, save_numpy({utt: tokens[utt] for utt in sorted(tokens)}))


def merge_parts(data_dir: str | Path, world_size: int) -> Path:
    """Join the per-rank part files into DIR/utt2speech_token.safetensors and remove them."""
    data_dir = Path(data_dir)
    parts = [data_dir / f"{OUTPUT}.part{r}" for r in range(world_size)]
    merged: dict[str, np.ndarray] = {}
    for part in parts:
        if not part.is_file():
            raise CosyError(f"part file {part} is missing: did every rank finish?")
        merged.update(load_numpy(str(part)))
    out = data_dir / OUTPUT
    save_tokens(out, merged)
    for part in parts:
        part.unlink()
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="Kaldi data dir (wav.scp, text, utt2spk)")
    parser.add_argument("--tokenizer", required=True,
                        help="cosy checkpoint (.safetensors with config.yaml beside it) or ONNX file")
    parser.add_argument("--batch-size", type=int, default=8, help="utterances (or 30 s windows) per batch")
    parser.add_argument("--num-workers", type=int, default=0, help="processes that load audio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if world_size > 1:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    backend = load_tokenizer(args.tokenizer, device)
    tokens, skipped = extract(args.data, backend, args.batch_size, args.num_workers, rank, world_size)
    data_dir = Path(args.data)
    if world_size > 1:
        save_tokens(data_dir / f"{OUTPUT}.part{rank}", tokens)
        torch.distributed.barrier()
        if rank == 0:
            merge_parts(data_dir, world_size)
        torch.distributed.destroy_process_group()
    else:
        save_tokens(data_dir / OUTPUT, tokens)
    count = sum(len(t) for t in tokens.values())
    print(f"rank {rank}: {len(tokens)} utterances, {count} tokens, {len(skipped)} skipped"
          + (f" ({', '.join(u for u, _ in skipped)})" if skipped else ""), file=sys.stderr)
    if rank == 0:
        print(f"wrote {data_dir / OUTPUT}")
    return 0
