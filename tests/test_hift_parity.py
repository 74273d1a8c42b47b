"""cosy's HiFT computes the reference vocoder's functions (tests/fixtures/reference).

The fixtures hold small random-weight HiFT models of CosyVoice v1 (22.05 kHz) and v2
(24 kHz), their inputs, every random draw of each call, and the outputs. Tolerance:
max abs diff 1e-4 (the reference's own float32-vs-float64 spread is up to 7e-5 on the
sine excitation; see the fixture README).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cosy.errors import CosyError
from cosy.vocoder.cosyvoice import convert_reference_state, hift_config, load_reference_state, reference_name
from cosy.vocoder.hifigan import Generator

REF = Path(__file__).parent / "fixtures" / "reference"
ATOL = 1e-4


def _draws(io: dict, case: str, version: int) -> dict:
    """The recorded random draws of `case` in SineSource's layout (batch, samples, harmonics)."""
    gaussian = io[f"rng.{case}.01.randn_like"]
    if version == 1:  # the v1 reference draws its noise as (batch, harmonics, samples)
        gaussian = gaussian.transpose(1, 2)
    return {"uniform": io[f"rng.{case}.00.rand"].reshape(1, -1), "gaussian": gaussian}


@pytest.fixture(scope="module", params=[1, 2], ids=["v1", "v2"])
def hift(request):
    version = request.param
    cfg, mel = hift_config(version, base_channels=16, f0_channels=16)
    torch.manual_seed(123)  # any init: the loaded state must overwrite every parameter
    generator = Generator(cfg, mel).eval()
    load_reference_state(generator, load_file(REF / f"cosyvoice_v{version}_hift.small.state.safetensors"))
    io = load_file(REF / f"cosyvoice_v{version}_hift.small.io.safetensors")
    return version, generator, io


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@torch.no_grad()
def test_f0_source_and_speech_match_reference(hift):
    version, generator, io = hift
    f0 = generator.predict_f0(io["in.mel"])
    assert _max_diff(f0, io["out.f0"]) < ATOL
    source = generator.make_source(f0, **_draws(io, "infer", version))
    assert _max_diff(source, io["out.source"]) < ATOL
    spec = generator.stft(io["out.source"][:, 0])  # the STFT alone, on the reference's source
    assert _max_diff(spec[:, :9], io["mid.s_stft_real"]) < ATOL
    assert _max_diff(spec[:, 9:], io["mid.s_stft_imag"]) < ATOL
    assert _max_diff(generator.decode(io["in.mel"], source), io["out.speech"]) < ATOL


@torch.no_grad()
def test_decode_with_reference_source(hift):
    _, generator, io = hift
    assert _max_diff(generator.decode(io["in.mel"], io["out.source"]), io["out.decode_speech"]) < ATOL


@torch.no_grad()
def test_source_module_case(hift):
    version, generator, io = hift
    excitation, uv = generator.source.excitation(io["in.src.f0"], **_draws(io, "src", version))
    assert _max_diff(excitation, io["mid.src.sine_waves"]) < ATOL
    assert torch.equal(uv, io["out.src.uv"])
    merged = torch.tanh(generator.source.merge(excitation))
    assert _max_diff(merged, io["out.src.sine_merge"]) < ATOL


@torch.no_grad()
def test_cache_source_case(hift):
    """The reference's `cache_source`: a given source prefix replaces the first samples."""
    version, generator, io = hift
    f0 = generator.predict_f0(io["in.mel"])
    source = generator.make_source(f0, **_draws(io, "cache", version))
    prefix = io["in.cache.cache_source"]
    source = torch.cat([prefix, source[..., prefix.shape[-1]:]], dim=-1)
    assert _max_diff(source, io["out.cache.source"]) < ATOL
    assert _max_diff(generator.decode(io["in.mel"], source), io["out.cache.speech"]) < ATOL


def _keys(version: int) -> dict[str, tuple[int, ...]]:
    rows = (REF / "keys" / f"cosyvoice_v{version}_hift.keys.tsv").read_text().splitlines()[1:]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape, *_ in (r.split("\t") for r in rows)}


@pytest.mark.parametrize("version", [1, 2])
def test_full_size_names_and_shapes(version):
    """The v1/v2-size config has exactly the released checkpoint's tensors, after the map."""
    keys = _keys(version)
    generator = Generator(*hift_config(version))
    own = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    mapped = {reference_name(k): shape for k, shape in keys.items()}
    assert len(mapped) == len(keys)  # the map is one-to-one
    assert mapped == own


def test_old_weight_norm_names_and_errors():
    state = load_file(REF / "cosyvoice_v1_hift.small.state.safetensors")
    old = {}
    for name, tensor in state.items():
        name = name.replace("parametrizations.weight.original0", "weight_g")
        old["generator." + name.replace("parametrizations.weight.original1", "weight_v")] = tensor
    assert convert_reference_state(old) == convert_reference_state(state)
    generator = Generator(*hift_config(1, 16, 16))
    del state["conv_post.bias"]
    with pytest.raises(CosyError, match="conv_post.bias"):
        load_reference_state(generator, state)
    with pytest.raises(CosyError, match="no counterpart"):
        reference_name("decoder.something.weight")
