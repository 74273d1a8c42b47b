"""Loading flow weights: cosy checkpoints and the reference (CosyVoice v1 `flow.pt`) layout.

Reference parameter name -> cosy name (i = level, j = transformer block, n = regulator
conv count; `last` = the last U-Net level, whose resampler is a bare Conv1d):

    input_embedding.*                              embedding.*
    spk_embed_affine_layer.*                       spk_proj.*
    encoder.*                                      encoder.* (cosy.modules ESPnet renames)
    encoder_proj.*                                 encoder_proj.*
    length_regulator.model.{3k}.*   (k < n)        regulator.blocks.{k}.conv.*
    length_regulator.model.{3k+1}.* (k < n)        regulator.blocks.{k}.norm.*
    length_regulator.model.{3n}.*                  regulator.proj.*
    decoder.estimator.time_mlp.linear_1.*          estimator.time_mlp.0.*
    decoder.estimator.time_mlp.linear_2.*          estimator.time_mlp.2.*
    decoder.estimator.down_blocks.{i}.0.*          estimator.down.{i}.resnet.*
    decoder.estimator.down_blocks.{i}.1.{j}.*      estimator.down.{i}.transformers.{j}.*
    decoder.estimator.down_blocks.{i}.2[.conv].*   estimator.down.{i}.resample.*
    decoder.estimator.mid_blocks.{i}.0 / .1.{j}    estimator.mid.{i}.resnet / .transformers.{j}
    decoder.estimator.up_blocks.{i}.0 / .1.{j} / .2[.conv]   estimator.up.{i}.(same)
    decoder.estimator.final_block.* / final_proj.* estimator.final_block.* / final_proj.*
  inside a ResNet block:      mlp.1 -> time, res_conv -> res, blockK.block.0 -> blockK.conv,
                              blockK.block.1 -> blockK.norm (also final_block.block.*);
                              the v2 causal estimator's blockK.block.2 -> blockK.norm
  inside a transformer block: attn1.to_q/to_k/to_v -> attn.linear_q/k/v,
                              attn1.to_out.0 -> attn.linear_out, norm3 -> norm2,
                              ff.net.0.proj -> ff.0, ff.net.2 -> ff.2
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cosy.checkpoint import load_weights
from cosy.errors import CosyError
from cosy.modules.transformer import rename_espnet_encoder_key

_ESTIMATOR_RULES: tuple[tuple[str, str], ...] = (
    (r"^time_mlp\.linear_1\.", "time_mlp.0."),
    (r"^time_mlp\.linear_2\.", "time_mlp.2."),
    (r"^down_blocks\.", "down."),
    (r"^mid_blocks\.", "mid."),
    (r"^up_blocks\.", "up."),
    (r"^(down|mid|up)\.(\d+)\.0\.", r"\1.\2.resnet."),
    (r"^(down|mid|up)\.(\d+)\.1\.", r"\1.\2.transformers."),
    (r"^(down|up)\.(\d+)\.2\.(conv\.)?", r"\1.\2.resample."),
    (r"\.mlp\.1\.", ".time."),
    (r"\.res_conv\.", ".res."),
    (r"block\.0\.", "conv."),
    (r"block\.1\.", "norm."),
    (r"block\.2\.", "norm."),  # causal blocks: conv, transpose, LayerNorm, transpose, Mish
    (r"\.attn1\.to_([qkv])\.", r".attn.linear_\1."),
    (r"\.attn1\.to_out\.0\.", ".attn.linear_out."),
    (r"\.norm3\.", ".norm2."),
    (r"\.ff\.net\.0\.proj\.", ".ff.0."),
    (r"\.ff\.net\.2\.", ".ff.2."),
)


def reference_to_cosy(name: str, regulator_convs: int) -> str:
    """Map one reference flow parameter name to cosy's name (see the module docstring)."""
    prefixes = {"input_embedding.": "embedding.", "spk_embed_affine_layer.": "spk_proj.",
                "encoder_proj.": "encoder_proj."}
    for old, new in prefixes.items():
        if name.startswith(old):
            return new + name[len(old):]
    if name.startswith("encoder."):
        return "encoder." + rename_espnet_encoder_key(name[len("encoder."):])
    match = re.match(r"^length_regulator\.model\.(\d+)\.(.*)$", name)
    if match:
        k, rest = int(match.group(1)), match.group(2)
        if k == 3 * regulator_convs:
            return f"regulator.proj.{rest}"
        return f"regulator.blocks.{k // 3}.{'conv' if k % 3 == 0 else 'norm'}.{rest}"
    if name.startswith("decoder.estimator."):
        name = name[len("decoder.estimator."):]
        for pattern, repl in _ESTIMATOR_RULES:
            name = re.sub(pattern, repl, name)
        return "estimator." + name
    raise CosyError(f"reference flow parameter '{name}' has no cosy counterpart")


def convert_reference_estimator(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `decoder.estimator.*` tensors of a reference flow state dict, renamed to the
    names inside cosy's Estimator (v1 ConditionalDecoder or v2 CausalConditionalDecoder)."""
    prefix = "decoder.estimator."
    return {reference_to_cosy(k, 0)[len("estimator."):]: v for k, v in state.items() if k.startswith(prefix)}


def convert_reference_state(state: dict[str, torch.Tensor], regulator_convs: int = 4) -> dict[str, torch.Tensor]:
    """A reference (CosyVoice v1 flow) state dict renamed to cosy's parameter names."""
    return {reference_to_cosy(k, regulator_convs): v for k, v in state.items()}


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path,
               config_path: str | Path | None = None) -> torch.nn.Module:
    """Load a cosy-named state dict into `model`; a size that differs from the config is
    reported with its config key, any other mismatch with the parameter's name."""
    cfg = model.cfg
    checks = (
        ("embedding.weight", 0, "model.vocab_size", cfg.vocab_size),
        ("spk_proj.weight", 1, "model.spk_dim", cfg.spk_dim),
        ("spk_proj.weight", 0, "model.mel.n_mels", cfg.n_mels),
        ("estimator.final_proj.weight", 0, "model.mel.n_mels", cfg.n_mels),
    )
    for key, dim, config_key, value in checks:
        if key in state and state[key].shape[dim] != value:
            raise CosyError(f"{source}: checkpoint has {config_key} = {state[key].shape[dim]} "
                            f"({key} {tuple(state[key].shape)}) but {config_path or 'the config'} says {value}")
    return load_weights(model, state, source, config_path)
