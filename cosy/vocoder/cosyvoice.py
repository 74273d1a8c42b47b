"""CosyVoice HiFT checkpoints in cosy: the configs of the released vocoders and the
parameter-name map from the reference implementation's `HiFTGenerator` to `Generator`.

Name map (reference -> cosy), applied after stripping a leading `generator.`; `nk` is the
number of resblock kernels (3), `X` the rest of the name:

| reference | cosy |
| --- | --- |
| `conv_pre.X`, `conv_post.X` | unchanged |
| `ups.{i}.X` | `stages.{i}.upsample.X` |
| `source_downs.{i}.X` | `stages.{i}.source_down.X` |
| `source_resblocks.{i}.R` | `stages.{i}.source_block.R` |
| `resblocks.{n}.R` | `stages.{n // nk}.blocks.{n % nk}.R` |
| R = `convs1.{k}.X` / `convs2.{k}.X` | `units.{k}.conv1.X` / `units.{k}.conv2.X` |
| R = `activations1.{k}.alpha` / `activations2.{k}.alpha` | `units.{k}.act1.alpha` / `units.{k}.act2.alpha` |
| `f0_predictor.condnet.{2i}.X` (convs; odd indices are ELUs) | `f0_predictor.convs.{i}.X` |
| `f0_predictor.classifier.X` | `f0_predictor.proj.X` |
| `m_source.l_linear.X` | `source.merge.X` |
| `*.weight_g` / `*.weight_v` (old weight-norm names) | `*.parametrizations.weight.original0` / `original1` |
"""

from __future__ import annotations

import re

import torch

from cosy.audio import MelConfig
from cosy.checkpoint import load_weights
from cosy.errors import CosyError
from cosy.vocoder.hifigan import Generator, GeneratorConfig
from cosy.vocoder.hift import SourceConfig


def hift_config(version: int, base_channels: int = 512, f0_channels: int = 512) -> tuple[GeneratorConfig, MelConfig]:
    """The HiFT of CosyVoice `version` (1: 22.05 kHz, 2: 24 kHz); smaller widths for tests."""
    if version not in (1, 2):
        raise CosyError(f"unknown CosyVoice version {version} (1 or 2)")
    three = [[1, 3, 5]] * 3
    if version == 1:
        rates, kernels, source_kernels, phase, mel = [8, 8], [16, 16], [7, 11], "sample", MelConfig.v1()
    else:
        rates, kernels, source_kernels, phase, mel = [8, 5, 3], [16, 11, 7], [7, 7, 11], "frame", MelConfig.v2()
    source = SourceConfig(harmonics=8, sine_amp=0.1, noise_std=0.003, voiced_threshold=10.0, phase=phase,
                          f0_channels=f0_channels, f0_layers=5, resblock_kernels=source_kernels,
                          resblock_dilations=three[:len(rates)])
    cfg = GeneratorConfig(base_channels=base_channels, upsample_rates=rates, upsample_kernels=kernels,
                          resblock_kernels=[3, 7, 11], resblock_dilations=three, activation="snake",
                          istft_n_fft=16, istft_hop=4, source=source)
    return cfg, mel


_BLOCK = [
    (r"convs1\.(\d+)\.(.*)", r"units.\1.conv1.\2"),
    (r"convs2\.(\d+)\.(.*)", r"units.\1.conv2.\2"),
    (r"activations1\.(\d+)\.alpha", r"units.\1.act1.alpha"),
    (r"activations2\.(\d+)\.alpha", r"units.\1.act2.alpha"),
]


def reference_name(name: str, num_kernels: int = 3) -> str:
    """cosy parameter name of the reference parameter `name` (CosyError if unknown)."""
    name = name.removeprefix("generator.")
    name = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", name)
    name = re.sub(r"\.weight_v$", ".parametrizations.weight.original1", name)
    if re.match(r"conv_(pre|post)\.", name):
        return name
    if m := re.fullmatch(r"ups\.(\d+)\.(.*)", name):
        return f"stages.{m[1]}.upsample.{m[2]}"
    if m := re.fullmatch(r"source_downs\.(\d+)\.(.*)", name):
        return f"stages.{m[1]}.source_down.{m[2]}"
    if m := re.fullmatch(r"source_resblocks\.(\d+)\.(.*)", name):
        return f"stages.{m[1]}.source_block.{_block_name(m[2], name)}"
    if m := re.fullmatch(r"resblocks\.(\d+)\.(.*)", name):
        stage, block = divmod(int(m[1]), num_kernels)
        return f"stages.{stage}.blocks.{block}.{_block_name(m[2], name)}"
    if m := re.fullmatch(r"f0_predictor\.condnet\.(\d+)\.(.*)", name):
        if int(m[1]) % 2:
            raise CosyError(f"reference parameter {name}: odd condnet entries are activations")
        return f"f0_predictor.convs.{int(m[1]) // 2}.{m[2]}"
    if m := re.fullmatch(r"f0_predictor\.classifier\.(.*)", name):
        return f"f0_predictor.proj.{m[1]}"
    if m := re.fullmatch(r"m_source\.l_linear\.(.*)", name):
        return f"source.merge.{m[1]}"
    raise CosyError(f"reference parameter {name} has no counterpart in cosy's HiFT")


def _block_name(rest: str, full: str) -> str:
    for pattern, replacement in _BLOCK:
        if re.fullmatch(pattern, rest):
            return re.sub(pattern, replacement, rest)
    raise CosyError(f"reference parameter {full} has no counterpart in cosy's ResBlock")


def convert_reference_state(state: dict[str, torch.Tensor], num_kernels: int = 3) -> dict[str, torch.Tensor]:
    """Reference HiFT state_dict -> cosy `Generator` state_dict (names only; tensors shared)."""
    return {reference_name(k, num_kernels): v for k, v in state.items()}


def load_reference_state(generator: Generator, state: dict[str, torch.Tensor], source: str = "<state>") -> None:
    """Load a reference HiFT state_dict into `generator`, requiring every tensor to match."""
    load_weights(generator, convert_reference_state(state, len(generator.cfg.resblock_kernels)), source)
