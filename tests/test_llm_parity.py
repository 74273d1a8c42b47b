"""The v1 LM against the reference numerics in tests/fixtures/reference.

Tolerance: max abs diff 1e-4 on float tensors (the fixtures' float32 noise is ~2e-6),
exact equality on tokens, targets and lengths.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cosy.errors import CosyError
from cosy.llm import LLM, LLMConfig, SamplingConfig
from cosy.llm.convert import load_v1_llm_state, rename_v1_llm_key
from cosy.llm.decode import Decoder, generate
from cosy.llm.sampling import exponential_draws, nucleus, sample
from cosy.modules import EncoderConfig

REF = Path(__file__).parent / "fixtures" / "reference"
ATOL = 1e-4


def small_v1_config() -> LLMConfig:
    """cosy config equal to the reference spec in cosyvoice_v1_llm.small.config.json."""
    spec = json.loads((REF / "cosyvoice_v1_llm.small.config.json").read_text())["spec"]["args"]

    def encoder(args: dict, layer: str) -> EncoderConfig:
        assert args["pos_enc_layer_type"] == "rel_pos_espnet" and args["static_chunk_size"] == 1
        return EncoderConfig(input_size=args["input_size"], d_model=args["output_size"],
                             n_heads=args["attention_heads"], ffn_dim=args["linear_units"],
                             n_layers=args["num_blocks"], input_layer=args["input_layer"], layer=layer,
                             causal=True, pos_enc="rel_pos")

    return LLMConfig(text_vocab=spec["text_token_size"], text_embed_dim=spec["text_encoder_input_size"],
                     speech_vocab=spec["speech_token_size"], spk_embed_dim=spec["spk_embed_dim"],
                     text_encoder=encoder(spec["text_encoder"]["args"], "conformer"),
                     lm=encoder(spec["llm"]["args"], "transformer"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    llm = LLM(small_v1_config()).eval()
    load_v1_llm_state(llm, load_file(REF / "cosyvoice_v1_llm.small.state.safetensors"))
    return llm


@pytest.fixture(scope="module")
def io():
    return load_file(REF / "cosyvoice_v1_llm.small.io.safetensors")


def close(a, b):
    return (a - b).abs().max().item() < ATOL


@torch.no_grad()
def test_training_forward_matches_reference(model, io):
    batch = {"text_token": io["in.train.text_token"].long(), "text_token_len": io["in.train.text_token_len"].long(),
             "speech_token": io["in.train.speech_token"].long(),
             "speech_token_len": io["in.train.speech_token_len"].long(), "embedding": io["in.train.embedding"]}
    encoded, _ = model.text_encoder(model.text_embedding(batch["text_token"]), batch["text_token_len"])
    valid = torch.arange(7)[None] < batch["text_token_len"][:, None]
    assert close(encoded[valid], io["mid.train.text_encoder_out"][valid])
    text = model.encode_text(batch["text_token"], batch["text_token_len"])
    x, lengths, prefix = model.assemble(text, batch["text_token_len"], model.speaker(batch["embedding"]),
                                        model.speech_embedding(batch["speech_token"]), batch["speech_token_len"])
    assert close(x, io["mid.train.lm_input"])
    hidden = model.hidden(x, lengths)
    assert close(hidden, io["mid.train.lm_output"])
    assert close(model.head(hidden), io["out.train.logits"])
    targets = model.targets(batch["speech_token"], batch["speech_token_len"], prefix, x.size(1))
    assert torch.equal(targets, io["mid.train.lm_target"])
    out = model(batch)
    assert abs(out["loss"].item() - io["out.train.loss"].item()) < ATOL
    assert abs(out["acc"].item() - io["out.train.acc"].item()) < 1e-6


@torch.no_grad()
def test_cached_inference_matches_reference(model, io):
    def item(name):
        tokens = io[name].long()
        return tokens, torch.tensor([tokens.size(1)])

    text, prompt_text, prompt_speech = item("in.infer.text"), item("in.infer.prompt_text"), \
        item("in.infer.prompt_speech_token")
    x, lengths = model.prepare(*text, *prompt_text, *prompt_speech, io["in.infer.embedding"])
    assert close(x, io["mid.infer.lm_input_step0"])
    decoder = Decoder(model, x, lengths, capacity=40)
    step_logits = []
    for token in io["out.infer.tokens"].long():
        step_logits.append(decoder.logits()[0])
        decoder.push(token[None], torch.tensor([True]))
    assert close(torch.stack(step_logits), io["out.infer.step_logits"])
    assert close(torch.log_softmax(torch.stack(step_logits), -1), io["out.infer.step_logp"])
    assert close(model.hidden(x, lengths), io["mid.infer.llm_out_step0"])
    tokens = generate(model, *text, *prompt_text, *prompt_speech, io["in.infer.embedding"],
                      sampling=SamplingConfig(greedy=True))[0]
    assert tokens[:5] == io["out.infer.tokens"].tolist()
    assert len(tokens) >= 12  # min_len = 2 * 6 text tokens: eos masked before


def ras_cases():
    cases = json.loads((REF / "ras_sampling.cases.json").read_text())
    tensors = load_file(REF / "ras_sampling.cases.safetensors")
    params = cases["params"]
    cfg = SamplingConfig(top_p=params["top_p"], top_k=params["top_k"], window=params["win_size"], tau=params["tau_r"])
    return [(cfg, case, tensors[f"case.{case['case']:02d}.scores"]) for case in cases["cases"]]


@pytest.mark.parametrize("cfg,case,scores", ras_cases(), ids=lambda v: str(v["case"]) if isinstance(v, dict) else "")
def test_ras_sampling_reproduces_reference(cfg, case, scores):
    ids, probs = nucleus(torch.softmax(scores, 0), cfg.top_p, cfg.top_k)
    assert ids.tolist() == case["nucleus_candidates"]
    assert torch.allclose(probs, torch.tensor(case["nucleus_probs"]), atol=1e-7)
    recorded = [torch.tensor(case["exp_draws_nucleus"])]
    if case["fallback_to_full_softmax"]:
        recorded.append(torch.tensor(case["exp_draws_fallback"]))
    supply = iter(recorded)
    assert sample(scores, case["history"], cfg, lambda n: next(supply)) == case["output"]
    assert next(supply, None) is None  # the fallback draws happened exactly when expected
    torch.manual_seed(case["seed"])  # same protocol as the reference: global seed, then one call
    assert sample(scores, case["history"], cfg, exponential_draws()) == case["output"]


def test_full_size_names_and_shapes_match_reference_listing():
    rows = [line.split("\t") for line in (REF / "keys" / "cosyvoice_v1_llm.keys.tsv").read_text().splitlines()[1:]]
    reference = {rename_v1_llm_key(name): tuple(int(d) for d in shape.split("x")) for name, shape, *_ in rows}
    with torch.device("meta"):  # shapes only: no 300M-parameter allocation
        full = LLM(LLMConfig())
    ours = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    assert len(rows) == 401
    assert ours == reference


def test_unknown_reference_key_is_named(model):
    with pytest.raises(CosyError, match="bogus.weight"):
        rename_v1_llm_key("bogus.weight")
    state = load_file(REF / "cosyvoice_v1_llm.small.state.safetensors")
    state.pop("llm_decoder.bias")
    with pytest.raises(CosyError, match="head.bias"):
        load_v1_llm_state(model, state)
