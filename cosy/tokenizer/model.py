"""The supervised semantic speech tokenizer (S3).

    log-mel (batch, 128, frames) at 100 Hz
      -> Encoder1 (conv subsampling x2 / x4 -> 50 / 25 Hz, transformer/conformer layers)
      -> quantiser (VQ / FSQ / none)          <- `tokenize` stops here
      -> Encoder2 -> ASR head (CTC + attention decoder over BPE ids)

Trained end to end with the ASR loss only, so the codes keep what the transcript needs
(content) and lose what it does not (speaker, channel). Encoder1 may instead be a
pretrained Whisper encoder (see `whisper_init`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cosy.audio import FrequencyWarpConfig, WhisperMelConfig, random_warp, whisper_log_mel
from cosy.errors import CosyError
from cosy.modules import Encoder, EncoderConfig, lengths_to_mask
from cosy.text.bpe import TextTokenizer
from cosy.tokenizer.adversary import SpeakerAdversary, SpeakerAdversaryConfig
from cosy.tokenizer.asr_head import AttentionDecoder, DecoderConfig, ctc_loss, greedy_ctc
from cosy.tokenizer.quantize import QuantizerConfig, build_quantizer


def _encoder1_default() -> EncoderConfig:
    return EncoderConfig(input_size=128, d_model=256, n_heads=4, ffn_dim=1024, n_layers=6,
                         input_layer="conv2d2", pos_enc="rotary")


def _encoder2_default() -> EncoderConfig:
    return EncoderConfig(input_size=256, d_model=256, n_heads=4, ffn_dim=1024, n_layers=6,
                         input_layer="none", pos_enc="rotary")


@dataclass
class TokenizerConfig:
    """The `model:` section of a `task: tokenizer` experiment.

    encoder1.input_layer sets the token rate: conv2d2 / conv1d2 -> 50 tokens/s, conv2d4 /
    conv1d4 -> 25.
    text_tokenizer: a saved cosy.text.bpe tokenizer; vocab_size must match it.
    Loss = ctc_weight * CTC + att_weight * attention CE + the quantiser's commitment term.
    whisper_path: a local Hugging Face Whisper model dir; when set, Encoder1 is its conv
    front and first `whisper_layers` layers (50 tokens/s) and `encoder1` is not used. The
    dir is read again whenever the model is built, also to load a trained checkpoint.
    max_seconds: longest audio the model accepts at once (the position tables' limit).
    warp: frequency-warp augmentation of the training log-mels. The same transcript then
    comes in more voices, which is meant to give the codes more reason to drop the voice.
    adversary: a speaker classifier on the codes, which the tokenizer learns to confuse so
    that the codes hide the voice (see `cosy.tokenizer.adversary`); off at weight 0.
    """

    mel: WhisperMelConfig = field(default_factory=WhisperMelConfig)
    encoder1: EncoderConfig = field(default_factory=_encoder1_default)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    encoder2: EncoderConfig = field(default_factory=_encoder2_default)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text_tokenizer: str = ""
    vocab_size: int = 0
    ctc_weight: float = 0.3
    att_weight: float = 0.7
    whisper_path: str | None = None
    whisper_layers: int | None = None
    max_seconds: float = 30.0
    warp: FrequencyWarpConfig = field(default_factory=FrequencyWarpConfig)
    adversary: SpeakerAdversaryConfig = field(default_factory=SpeakerAdversaryConfig)


# Weights only training uses; tokenizing, export and model dirs leave them out.
TRAINING_ONLY = "adversary."


def load_text_tokenizer(cfg: TokenizerConfig) -> TextTokenizer:
    """The BPE tokenizer named by `cfg.text_tokenizer`; the ASR head predicts exactly its vocabulary."""
    return TextTokenizer.load_for_model(cfg.text_tokenizer, "model.text_tokenizer", cfg.vocab_size,
                                        "model.vocab_size", exact=True)


def log_mel(wave: Tensor, cfg: TokenizerConfig, lengths: Tensor | None = None) -> Tensor:
    """(batch, samples) at cfg.mel.sample_rate -> (batch, n_mels, frames)."""
    return whisper_log_mel(wave, cfg.mel, lengths)


class TokenizerModel(nn.Module):
    """num_speakers > 0 adds the speaker adversary (training only: tokenizing, transcribing
    and export do not use it, and `load_checkpoint` builds the model without it)."""

    def __init__(self, cfg: TokenizerConfig, num_speakers: int = 0):
        super().__init__()
        self.cfg = cfg
        cfg.warp.check("model.warp")
        cfg.adversary.check("model.adversary")
        if cfg.vocab_size < 1:
            raise CosyError(f"config key 'model.vocab_size' must be >= 1, got {cfg.vocab_size}")
        if cfg.whisper_path:
            from cosy.tokenizer.whisper_init import WhisperEncoder1

            self.encoder1 = WhisperEncoder1(cfg.whisper_path, cfg.whisper_layers)
            width, n_mels, self.rate_factor = self.encoder1.d_model, self.encoder1.n_mels, 2
            if n_mels != cfg.mel.n_mels:
                raise CosyError(f"config key 'model.mel.n_mels' is {cfg.mel.n_mels} but the Whisper model "
                                f"in {cfg.whisper_path} takes {n_mels} mel bins")
        else:
            if cfg.encoder1.input_layer not in ("conv2d2", "conv2d4", "conv1d2", "conv1d4"):
                raise CosyError("config key 'model.encoder1.input_layer' must be conv2d2 / conv1d2 (50 tokens/s) "
                                f"or conv2d4 / conv1d4 (25 tokens/s), got {cfg.encoder1.input_layer!r}")
            if cfg.encoder1.input_size != cfg.mel.n_mels:
                raise CosyError(f"config key 'model.encoder1.input_size' must equal model.mel.n_mels "
                                f"({cfg.mel.n_mels}), got {cfg.encoder1.input_size}")
            self.encoder1 = Encoder(cfg.encoder1)
            width, self.rate_factor = cfg.encoder1.d_model, int(cfg.encoder1.input_layer[-1])
        if cfg.encoder2.input_size != width:
            raise CosyError(f"config key 'model.encoder2.input_size' must equal Encoder1's width ({width}), "
                            f"got {cfg.encoder2.input_size}")
        self.quantizer = build_quantizer(cfg.quantizer, width)
        self.encoder2 = Encoder(cfg.encoder2)
        self.blank = cfg.vocab_size
        self.ctc = nn.Linear(cfg.encoder2.d_model, cfg.vocab_size + 1)
        self.decoder = (AttentionDecoder(cfg.decoder, cfg.encoder2.d_model, cfg.vocab_size)
                        if cfg.decoder.n_layers > 0 and cfg.att_weight > 0 else None)
        self.adversary = SpeakerAdversary(cfg.adversary, width, num_speakers) if num_speakers > 0 else None

    @property
    def token_rate(self) -> float:
        """Tokens per second."""
        return self.cfg.mel.sample_rate / self.cfg.mel.hop_length / self.rate_factor

    @property
    def max_frames(self) -> int:
        """Longest input in log-mel frames: model.max_seconds, or less if a Whisper Encoder1's
        position table is shorter."""
        frames = round(self.cfg.max_seconds * self.cfg.mel.sample_rate / self.cfg.mel.hop_length)
        return frames if isinstance(self.encoder1, Encoder) else min(frames, self.encoder1.max_frames)

    def _check_length(self, feats: Tensor) -> None:
        if feats.shape[-1] > self.max_frames:
            raise CosyError(f"input of {feats.shape[-1]} frames is longer than the model's limit of "
                            f"{self.max_frames} frames (model.max_seconds, or Whisper's positions); split the audio")

    def encode(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder1: (batch, n_mels, frames) -> (batch, tokens, width), token counts."""
        if isinstance(self.encoder1, Encoder):
            return self.encoder1(feats.transpose(1, 2), lengths)
        return self.encoder1(feats, lengths)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch: feats (batch, n_mels, frames), feats_lengths, text_ids (batch, L) padded
        with -1, text_lengths, with the adversary speakers (batch,) -> loss terms.

        The adversary's losses are in the total only in training: validation loss stays the ASR's.
        """
        self._check_length(batch["feats"])
        feats = random_warp(batch["feats"], self.cfg.warp, self.cfg.mel)[0] if self.training else batch["feats"]
        x, lengths = self.encode(feats, batch["feats_lengths"])
        mask = lengths_to_mask(lengths, x.shape[1])
        x, _, losses = self.quantizer(x, mask)
        out = {}
        if self.adversary is not None:
            out.update(self.adversary(x, mask, batch["speakers"]))
        x, lengths = self.encoder2(x, lengths)
        out["ctc"] = ctc_loss(self.ctc(x), lengths, batch["text_ids"], batch["text_lengths"], self.blank)
        total = self.cfg.ctc_weight * out["ctc"]
        if self.training and self.adversary is not None:
            total = total + out["adv"] + self.cfg.adversary.weight * out["confusion"]
        if self.decoder is not None:
            out["att"], out["acc"] = self.decoder(x, lengths, batch["text_ids"], batch["text_lengths"])
            total = total + self.cfg.att_weight * out["att"]
        for name, value in losses.items():
            out[name] = value
            total = total + value
        out["loss"] = total
        return out

    @torch.no_grad()
    def tokenize(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(batch, n_mels, frames), (batch,) -> codes (batch, ceil(frames / r)) long, counts.

        Codes past a row's count are padding (their values are unspecified).
        """
        self._check_length(feats)
        x, token_lengths = self.encode(feats, lengths.long())
        return self.quantizer.encode(x), token_lengths

    @torch.no_grad()
    def transcribe(self, feats: Tensor, lengths: Tensor) -> list[list[int]]:
        """Greedy CTC decoding of the model's own ASR head -> BPE ids per utterance."""
        self._check_length(feats)
        x, lengths = self.encode(feats, lengths.long())
        mask = lengths_to_mask(lengths, x.shape[1])
        x, _, _ = self.quantizer(x, mask)
        x, lengths = self.encoder2(x, lengths)
        return greedy_ctc(self.ctc(x), lengths, self.blank)
