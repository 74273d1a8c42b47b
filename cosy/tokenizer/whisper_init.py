"""Encoder1 initialised from a pretrained Hugging Face Whisper encoder (a local directory).

cosy's `Encoder` cannot express Whisper's encoder layer exactly: Whisper adds a learned
absolute position table without scaling its input, its key projection has no bias and its
front end is two Conv1d layers rather than a Conv2d subsampler. Rather than approximate it,
this module keeps transformers' own Whisper modules (conv1, conv2, the position table and
the first `num_layers` encoder layers) and only adds what the tokenizer needs on top:
arbitrary input lengths up to 30 s and padding masks, so that a padded batch gives the
same output as each utterance alone. Whisper's conv2 has stride 2, so this front end runs
at 50 frames per second.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosy.errors import CosyError
from cosy.modules.masks import lengths_to_mask


def load_whisper_encoder(path: str | Path) -> nn.Module:
    """transformers' WhisperEncoder with the weights of the model saved in directory `path`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CosyError(f"whisper_path {path}: no config.json (expected a Hugging Face Whisper model directory)")
    try:
        from transformers import WhisperModel
    except ImportError as err:
        raise CosyError("initialising from Whisper needs transformers: pip install 'cosy[hf]'") from err
    try:
        # eager attention: a plain additive mask, exportable to ONNX
        model = WhisperModel.from_pretrained(str(path), attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise CosyError(f"whisper_path {path}: cannot load a Whisper model: {err}") from err
    return model.get_encoder()


class WhisperEncoder1(nn.Module):
    """Whisper conv front + first `num_layers` encoder layers (all, with the final norm, if None).

    Input: log-mel (batch, n_mels, frames) with frame counts (batch,).
    Output: (batch, ceil(frames / 2), d_model) and the output frame counts.
    """

    def __init__(self, path: str | Path, num_layers: int | None = None):
        super().__init__()
        encoder = load_whisper_encoder(path)
        total = len(encoder.layers)
        if num_layers is not None and not 1 <= num_layers <= total:
            raise CosyError(f"config key 'model.whisper_layers' must be in 1..{total} for {path}, got {num_layers}")
        self.conv1 = encoder.conv1
        self.conv2 = encoder.conv2
        self.embed_positions = encoder.embed_positions
        self.layers = nn.ModuleList(encoder.layers[:num_layers or total])
        # Whisper's final LayerNorm belongs after its last layer only
        self.norm = encoder.layer_norm if (num_layers or total) == total else nn.Identity()
        self.n_mels = encoder.config.num_mel_bins
        self.d_model = encoder.config.d_model
        # input frames its position table covers (3000 = 30 s for the released Whisper sizes)
        self.max_frames = encoder.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        mask = lengths_to_mask(lengths, feats.shape[-1])[:, None, :]
        # zero padded frames before each conv so the last real frames see what they would alone
        x = F.gelu(self.conv1(feats * mask))
        x = F.gelu(self.conv2(x * mask))
        out_lengths = (lengths + 1) // 2
        x = x.transpose(1, 2) + self.embed_positions.weight[: x.shape[-1]]
        key_valid = lengths_to_mask(out_lengths, x.shape[1])[:, None, None, :]
        bias = torch.zeros(key_valid.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~key_valid, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, bias)
        return self.norm(x), out_lengths
