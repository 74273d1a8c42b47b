"""`cosy extract embeddings`: speaker embeddings of every utterance of a data dir.

Writes DIR/utt2embedding.safetensors (one float32 vector per utterance) and
DIR/spk2embedding.safetensors (the mean over each speaker's utterances). The model is
a cosy checkpoint (a .safetensors file with the experiment's config.yaml next to it) or
an ONNX file in the released contract: float32 [1, frames, 80] mean-normalised fbank
in, [1, embedding_dim] out.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cosy.checkpoint import load_weights, read_experiment
from cosy.errors import CosyError
from cosy.speaker.features import file_features
from cosy.speaker.model import SpeakerConfig, SpeakerEncoder, build_encoder

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> SpeakerEncoder:
    """The embedding network of a `task: speaker` checkpoint, in eval mode."""
    # A training checkpoint also holds the classifier; only the encoder is needed here.
    cfg, state, config_path = read_experiment(path, "speaker", SpeakerConfig, prefix="encoder.")
    return load_weights(build_encoder(cfg), state, path, config_path).eval()


class TorchEncoder:
    """An embedding network as a function (frames, n_mels) -> numpy (embedding_dim,)."""

    def __init__(self, encoder: SpeakerEncoder, device: str = "cpu"):
        self.encoder = encoder.to(device).eval()
        self.device = device
        self.feat_dim = encoder.cfg.feat_dim
        self.embedding_dim = encoder.cfg.embedding_dim

    @torch.inference_mode()
    def __call__(self, feats: torch.Tensor) -> np.ndarray:
        return self.encoder(feats[None].to(self.device))[0].float().cpu().numpy()


class OnnxEncoder:
    """An ONNX file in the released contract as a function (frames, n_mels) -> (embedding_dim,)."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise CosyError(f"cannot load ONNX speaker model {path}: {err}") from err
        # Released files name their input differently; the contract is positional.
        feats = self.session.get_inputs()[0]
        if len(feats.shape) != 3 or not isinstance(feats.shape[-1], int):
            raise CosyError(f"ONNX speaker model {path}: input 0 must be [1, frames, n_mels] with fixed n_mels, "
                            f"got {feats.shape}")
        self.input_name = feats.name
        self.feat_dim = feats.shape[-1]
        self.embedding_dim = self.session.get_outputs()[0].shape[-1]

    def __call__(self, feats: torch.Tensor) -> np.ndarray:
        out = self.session.run(None, {self.input_name: feats[None].numpy().astype(np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)


def load_speaker_encoder(path: str | Path, device: str = "cpu") -> TorchEncoder | OnnxEncoder:
    path = Path(path)
    if not path.is_file():
        raise CosyError(f"speaker model not found: {path}")
    if path.suffix == ".onnx":
        return OnnxEncoder(path)
    return TorchEncoder(load_checkpoint(path), device)


class _UtteranceFeatures(Dataset):
    """(utt, path) pairs -> (utt, features or None, error message); decoding runs in workers."""

    def __init__(self, items: list[tuple[str, str]], n_mels: int):
        self.items = items
        self.n_mels = n_mels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        utt, path = self.items[i]
        try:
            return utt, file_features(path, self.n_mels), ""
        except CosyError as err:
            return utt, None, str(err)


def embed_utterances(wav: dict[str, str], encoder, num_workers: int = 0) -> dict[str, np.ndarray]:
    """utt -> embedding for every readable file of `wav` (utt -> path); bad files are logged and skipped."""
    dataset = _UtteranceFeatures(sorted(wav.items()), encoder.feat_dim)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    out: dict[str, np.ndarray] = {}
    for utt, feats, error in tqdm(loader, desc="speaker embeddings", unit="utt", disable=None):
        if feats is None:
            log.warning("skipping utterance %s: %s", utt, error)
            continue
        vector = encoder(feats)
        if not np.isfinite(vector).all():
            log.warning("skipping utterance %s: its embedding is not finite (audio too short?)", utt)
            continue
        out[utt] = vector
    return out


def speaker_means(embeddings: dict[str, np.ndarray], utt2spk: dict[str, str]) -> dict[str, np.ndarray]:
    groups: dict[str, list[np.ndarray]] = {}
    for utt, vector in embeddings.items():
        groups.setdefault(utt2spk[utt], []).append(vector)
    return {spk: np.mean(vectors, axis=0).astype(np.float32) for spk, vectors in sorted(groups.items())}


def save_embeddings(path: Path, table: dict[str, np.ndarray]) -> None:
    save_file({key: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for key, v in sorted(table.items())},
              str(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="Kaldi data dir (wav.scp, utt2spk, ...)")
    parser.add_argument("--speaker", required=True,
                        help="a cosy checkpoint (.safetensors with config.yaml beside it) or an .onnx file")
    parser.add_argument("--num-workers", type=int, default=0, help="processes decoding audio (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device for a checkpoint (default cpu)")


def run(args: argparse.Namespace) -> int:
    from cosy.data.kaldi import DataDir

    if args.num_workers < 0:
        raise CosyError(f"--num-workers must be >= 0, got {args.num_workers}")
    data = DataDir.load(args.data)
    encoder = load_speaker_encoder(args.speaker, args.device)
    embeddings = embed_utterances(data.wav, encoder, args.num_workers)
    if not embeddings:
        raise CosyError(f"no utterance of {args.data} could be embedded (see the warnings above)")
    speakers = speaker_means(embeddings, data.utt2spk)
    out = Path(args.data)
    save_embeddings(out / "utt2embedding.safetensors", embeddings)
    save_embeddings(out / "spk2embedding.safetensors", speakers)
    skipped = len(data.wav) - len(embeddings)
    print(f"wrote {len(embeddings)} utterance and {len(speakers)} speaker embeddings "
          f"(dim {encoder.embedding_dim}) to {out}" + (f"; skipped {skipped} utterance(s)" if skipped else ""))
    return 0
