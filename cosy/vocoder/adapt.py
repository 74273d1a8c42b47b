"""Fit a trained vocoder to one voice, from one recording of it, before synthesis.

A small vocoder trained on few voices loses some unseen ones even on their own
recordings' mels (recipes/mini/RESULTS.md, "The vocoder fitted to the prompt"). A
zero-shot prompt is a recording of the very voice to be spoken, so it gives exact
(mel, audio, f0) training pairs at no cost: a copy of the generator takes a few steps of
its reconstruction loss (mel L1 and, for HiFT, f0 L1; no discriminator) on random
segments of the prompt, with the sine source driven by the recording's f0 as in NSF
training, so that the generator and the f0 predictor both learn the voice.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch

from cosy.errors import CosyError
from cosy.vocoder.hifigan import Generator
from cosy.vocoder.model import VocoderConfig, generate, reconstruction_loss
from cosy.vocoder.task import collate, featurizer, segmenter

BETAS = (0.8, 0.99)  # the vocoder's training betas (HiFi-GAN)
LEARNING_RATE = 2e-4  # with 200 steps: recipes/mini/RESULTS.md, "The vocoder fitted to the prompt"


def fit_to_recording(generator: Generator, cfg: VocoderConfig, wave: np.ndarray, steps: int, lr: float,
                     batch_size: int = 8, seed: int = 0) -> Generator:
    """A copy of `generator` trained `steps` Adam steps at `lr` on `wave` (mono float32 at
    `cfg.mel.sample_rate`), `batch_size` random segments of `cfg.segment_frames` frames a
    step; `generator` itself is left as it is. On a CPU the same seed gives the same copy.
    The segments' features are made as in training (`cosy.vocoder.task`), f0 included."""
    if steps < 1:
        raise CosyError(f"vocoder adaptation needs at least 1 step, got {steps}")
    if lr <= 0:
        raise CosyError(f"vocoder adaptation needs a learning rate > 0, got {lr}")
    device = next(generator.parameters()).device
    rng = random.Random(seed)
    row = {"utt": "prompt", "wave": np.asarray(wave, dtype=np.float32)}
    cut, features = segmenter(cfg, train=True, rng=rng), featurizer(cfg)
    # the source's noise draws must not move the caller's random stream; and a copy made
    # under the caller's inference mode (CosyTTS.convert) would be untrainable
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        fitted = copy.deepcopy(generator).train()
        optimiser = torch.optim.Adam(fitted.parameters(), lr=lr, betas=BETAS)
        for _ in range(steps):
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in collate([features(cut(row)) for _ in range(batch_size)]).items()}
            loss, _ = reconstruction_loss(cfg, *generate(fitted, batch, target_f0=True), batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return fitted.eval()

