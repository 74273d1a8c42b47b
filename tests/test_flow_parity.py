"""The v1-size flow computes the reference's function (tests/fixtures/reference, "v1 flow").

The small fixture's weights go through the documented name map into a FlowModel built
with the matching config. Tolerance: max abs diff 1e-4 (float32; the fixtures README
puts the intrinsic float32 noise of the full inference at about 6e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cosy.flow.checkpoint import (convert_reference_estimator, convert_reference_state, load_state,
                                  reference_to_cosy)
from cosy.flow.estimator import Estimator, EstimatorConfig
from cosy.flow.model import FlowConfig, FlowModel
from cosy.modules.transformer import EncoderConfig

REF = Path(__file__).parent / "fixtures" / "reference"
ATOL = 1e-4


def small_config() -> FlowConfig:
    """The sizes of cosyvoice_v1_flow.small.config.json."""
    return FlowConfig(
        vocab_size=64,
        encoder=EncoderConfig(input_size=64, d_model=64, n_heads=4, ffn_dim=128, n_layers=2,
                              layer="conformer", pos_enc="rel_pos", input_layer="linear"),
        estimator=EstimatorConfig(channels=[32, 32], n_blocks=1, n_mid_blocks=1, heads=4, head_dim=16),
    )


@pytest.fixture(scope="module")
def model() -> FlowModel:
    flow = FlowModel(small_config()).eval()
    state = load_file(str(REF / "cosyvoice_v1_flow.small.state.safetensors"))
    load_state(flow, convert_reference_state(state), "cosyvoice_v1_flow.small")
    return flow


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(REF / "cosyvoice_v1_flow.small.io.safetensors"))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def test_estimator_matches_reference(model, io):
    with torch.no_grad():
        y = model.estimator(io["in.est.x"], io["in.est.mask"], io["in.est.mu"], io["in.est.t"],
                            io["in.est.spks"], io["in.est.cond"])
    assert max_diff(y, io["out.est.y"]) < ATOL


def test_length_regulator_training_path(model, io):
    with torch.no_grad():
        y = model.regulator(io["in.lr.h"], io["in.lr.ylens"].long())
    assert max_diff(y.transpose(1, 2), io["out.lr.y"]) < ATOL


@pytest.mark.parametrize("case", ["a", "b"])
def test_encoder_and_conditioning(model, io, case):
    """Case a has a prompt; case b has 45 target tokens (three-piece stretching), no prompt."""
    tokens, prompt = io[f"in.{case}.token"], io[f"in.{case}.prompt_token"]
    both = torch.cat([prompt, tokens], dim=1)
    with torch.no_grad():
        h = model.encode(both, torch.tensor([both.shape[1]]))
        mu = model.condition(tokens, prompt, io[f"in.{case}.prompt_feat"].shape[1])
    assert max_diff(h, io[f"mid.{case}.encoder_proj_out"]) < ATOL
    assert max_diff(mu, io[f"mid.{case}.mu"]) < ATOL


@pytest.mark.parametrize("case", ["a", "b"])
def test_full_inference_with_recorded_noise(model, io, case):
    mel = model.inference(io[f"in.{case}.token"], io[f"in.{case}.prompt_token"],
                          io[f"in.{case}.prompt_feat"].transpose(1, 2), io[f"in.{case}.embedding"],
                          noise=io[f"rng.{case}.00.randn_like"])
    assert max_diff(mel, io[f"out.{case}.mel"]) < ATOL


def test_full_size_names_and_shapes_match_listing():
    """Every tensor of the published v1 flow maps onto the v1-size config, none left over."""
    listing = {}
    for line in (REF / "keys" / "cosyvoice_v1_flow.keys.tsv").read_text().splitlines()[1:]:
        name, shape = line.split("\t")[:2]
        listing[reference_to_cosy(name, 4)] = tuple(int(d) for d in shape.split("x"))
    ours = {k: tuple(v.shape) for k, v in FlowModel(FlowConfig()).state_dict().items()}
    assert len(listing) == 1185
    assert ours == listing


def test_causal_estimator_matches_reference_v2_chunked_estimator():
    """cosy's causal estimator is the reference v2 CausalConditionalDecoder with its
    50-frame chunk attention (`out.est.y_streaming` of the v2 flow fixture)."""
    state = load_file(str(REF / "cosyvoice_v2_flow.small.state.safetensors"))
    io = load_file(str(REF / "cosyvoice_v2_flow.small.io.safetensors"))
    cfg = EstimatorConfig(channels=[32], n_blocks=1, n_mid_blocks=1, heads=4, head_dim=16)
    estimator = Estimator(cfg, n_mels=80, causal=True, chunk=50).eval()
    estimator.load_state_dict(convert_reference_estimator(state))
    with torch.no_grad():
        y = estimator(*(io[f"in.est.{n}"] for n in ("x", "mask", "mu", "t", "spks", "cond")))
    assert max_diff(y, io["out.est.y_streaming"]) < ATOL
