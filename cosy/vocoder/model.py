"""The vocoder as a GAN for the common trainer.

`VocoderModel(batch, turn="discriminator")` generates audio from the batch mel, scores
real and generated (detached) audio, and returns the LSGAN discriminator loss.
`VocoderModel(batch, turn="generator")` returns the generator loss: adversarial +
2 x feature matching + 45 x mel L1 (+ f0 L1 for HiFT). `turn="warmup"` returns only its
reconstruction terms (mel, f0) without running the discriminator, for the trainer's
`gan_warmup_steps`.

The audio generated in the discriminator turn is cached on the module and reused by
the generator turn of the same batch (the trainer runs the two turns back to back and
the generator weights do not change in between), which saves one generator forward per
step. A generator turn without a preceding discriminator turn (validation) generates.

Batch (from `cosy.vocoder.task`): `audio` `(batch, samples)`, `mel` `(batch, n_mels,
frames)` with samples = frames * hop, and for HiFT `f0` `(batch, frames)` in Hz.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cosy.audio import MelConfig, mel_spectrogram
from cosy.errors import CosyError
from cosy.vocoder.discriminators import Discriminator, DiscriminatorConfig
from cosy.vocoder.hifigan import Generator, GeneratorConfig
from cosy.vocoder.losses import discriminator_loss, feature_matching_loss, generator_loss


@dataclass
class LossWeights:
    adversarial: float = 1.0
    feature: float = 2.0
    mel: float = 45.0
    f0: float = 1.0


@dataclass
class VocoderConfig:
    """The `model:` section of a `task: vocoder` experiment."""

    mel: MelConfig = field(default_factory=MelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    # the mel L1 is taken up to this frequency (null: Nyquist), wider than the input mel
    # so that the generator is also taught the band above it
    loss_fmax: float | None = None
    segment_frames: int = 32          # training segment length in mel frames
    f0_min: float = 60.0              # search range of the f0 targets (HiFT)
    f0_max: float = 600.0
    # f0 that drives HiFT's sine source in training: "predicted" (CosyVoice's HiFT) or
    # "target", the f0 of the training audio, as in NSF vocoders. With "predicted", a small
    # generator trained briefly learns to zero the source, whose pitch is wrong early on,
    # and then no longer follows any f0 (recipes/mini/RESULTS.md, "A buzz at the frame
    # rate"). Validation and inference use the predictor either way.
    source_f0: Literal["predicted", "target"] = "predicted"


class VocoderModel(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        if cfg.segment_frames < 1:
            raise CosyError("model.segment_frames must be at least 1")
        self.cfg = cfg
        self.generator = Generator(cfg.generator, cfg.mel)
        self.discriminator = Discriminator(cfg.discriminator)
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, batch: dict, turn: str = "generator") -> dict[str, torch.Tensor]:
        if turn == "discriminator":
            return self._discriminator_turn(batch)
        if turn in ("generator", "warmup"):
            return self._generator_turn(batch, adversarial=turn == "generator")
        raise CosyError(f"unknown GAN turn '{turn}' (discriminator, generator or warmup)")

    def _generate(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._cache is not None and self._cache[0] is batch["mel"] and self.training:
            _, fake, f0 = self._cache
        else:
            fake, f0 = generate(self.generator, batch, target_f0=self.training and self.cfg.source_f0 == "target")
        self._cache = None
        return fake, f0

    def _discriminator_turn(self, batch: dict) -> dict[str, torch.Tensor]:
        fake, f0 = self._generate(batch)
        self._cache = (batch["mel"], fake, f0)
        real_scores, _ = self.discriminator(batch["audio"])
        fake_scores, _ = self.discriminator(fake.detach())
        return {"loss": discriminator_loss(real_scores, fake_scores)}

    def _generator_turn(self, batch: dict, adversarial: bool = True) -> dict[str, torch.Tensor]:
        fake, f0 = self._generate(batch)
        loss, terms = reconstruction_loss(self.cfg, fake, f0, batch)
        if adversarial:
            w = self.cfg.loss
            _, real_features = self.discriminator(batch["audio"])
            fake_scores, fake_features = self.discriminator(fake)
            terms["adversarial"] = generator_loss(fake_scores)
            terms["feature"] = feature_matching_loss(real_features, fake_features)
            loss = loss + w.adversarial * terms["adversarial"] + w.feature * terms["feature"]
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


def generate(generator: Generator, batch: dict, target_f0: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(audio `(batch, samples)`, predicted f0 `(batch, frames)` or None) from `batch["mel"]`;
    with `target_f0`, HiFT's sine source follows `batch["f0"]` instead of the prediction."""
    if not (target_f0 and generator.source is not None):
        return generator(batch["mel"])
    return generator.decode(batch["mel"], generator.make_source(batch["f0"])), generator.predict_f0(batch["mel"])


def reconstruction_loss(cfg: VocoderConfig, fake: torch.Tensor, f0: torch.Tensor | None,
                        batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's losses without a discriminator: weighted mel L1 (up to `loss_fmax`) of
    `fake` `(batch, samples)` against `batch["audio"]`, plus f0 L1 of the predicted `f0`
    `(batch, frames)` against `batch["f0"]` when there is one -> (loss, {term: value})."""
    loss_mel = dataclasses.replace(cfg.mel, fmax=cfg.loss_fmax or cfg.mel.sample_rate / 2)
    mel = F.l1_loss(mel_spectrogram(fake, loss_mel), mel_spectrogram(batch["audio"], loss_mel))
    terms = {"mel": mel}
    loss = cfg.loss.mel * mel
    if f0 is not None:
        terms["f0"] = F.l1_loss(f0, batch["f0"])
        loss = loss + cfg.loss.f0 * terms["f0"]
    return loss, terms
