"""`cosy convert cosyvoice` on a released-style directory made of tests/fixtures/reference.

The directory holds the small reference v1 LM, flow and HiFT state dicts saved with
`torch.save` as the released .pt files are, a hyperpyyaml cosyvoice.yaml with the small
sizes, ONNX speaker and speech-tokenizer models exported from cosy's tiny models in the
released contracts, and a small tiktoken vocabulary. The converted model dir, loaded the
way `cosy synthesize` loads it, must reproduce the fixtures' outputs. Tolerance: max abs
diff 1e-4 on float tensors (as in the per-model parity tests), exact on tokens.

The Whisper layout puts 1609 special tokens after the BPE ranks, more than the small LM's
100 text rows, so the LM's text embedding is padded with extra rows in the fake llm.pt;
every text id the fixtures use is < 100, so their outputs are unchanged.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import regex
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

from cosy.bench import TINY, synthetic_prompt, write_random_experiments
from cosy.cli import main as cli_main
from cosy.convert.cosyvoice import map_state, read_released_yaml, targets
from cosy.errors import CosyError
from cosy.inference import model_dir
from cosy.llm import SamplingConfig
from cosy.llm.decode import Decoder, generate
from cosy.text.whisper_bpe import whisper_specials, whisper_tokenizer

REF = Path(__file__).parent / "fixtures" / "reference"
ATOL = 1e-4
# A tiny tiktoken vocabulary: the 256 bytes, then tokens each made of two earlier ones.
MERGED = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" a", b"er", b"on", b"an", b"is", b" s", b"es"]
RANKS = [bytes([b]) for b in range(256)] + MERGED
TEXT_VOCAB = len(RANKS) + len(whisper_specials())
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

RELEASED_YAML = """\
__set_seed1: !apply:random.seed [1986]
sample_rate: 22050
text_encoder_input_size: {text_embed}
llm_input_size: {llm_in}
llm_output_size: {llm_out}
spk_embed_dim: 192

llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: {text_vocab}
    speech_token_size: {speech_vocab}
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: {te_out}
        attention_heads: {te_heads}
        linear_units: {te_ffn}
        num_blocks: {te_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: {lm_heads}
        linear_units: {lm_ffn}
        num_blocks: {lm_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {flow_in}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {speech_vocab}
    input_frame_rate: 50
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: {fe_out}
        attention_heads: {fe_heads}
        linear_units: {fe_ffn}
        num_blocks: {fe_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {flow_in}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: {est_channels}
            dropout: 0
            attention_head_dim: {head_dim}
            n_blocks: {est_blocks}
            num_mid_blocks: {mid}
            num_heads: {est_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_base}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}

get_tokenizer: !name:whisper.tokenizer.get_tokenizer
    multilingual: True
    num_languages: 100
    language: 'en'
    task: 'transcribe'
"""
# The small fixtures' sizes and the published CosyVoice-300M recipe's.
SMALL = dict(text_embed=48, llm_in=80, llm_out=64, text_vocab=0, speech_vocab=64, te_out=64, te_heads=4, te_ffn=128,
             te_blocks=2, lm_heads=4, lm_ffn=128, lm_blocks=2, flow_in=64, fe_out=64, fe_heads=4, fe_ffn=128,
             fe_blocks=2, est_channels=[32, 32], head_dim=16, est_blocks=1, mid=1, est_heads=4, hift_base=16,
             f0_channels=16)
FULL = dict(text_embed=512, llm_in=1024, llm_out=1024, text_vocab=51866, speech_vocab=4096, te_out=1024, te_heads=16,
            te_ffn=4096, te_blocks=6, lm_heads=16, lm_ffn=4096, lm_blocks=14, flow_in=512, fe_out=512, fe_heads=8,
            fe_ffn=2048, fe_blocks=6, est_channels=[256, 256], head_dim=64, est_blocks=4, mid=12, est_heads=8,
            hift_base=512, f0_channels=512)


def small_yaml() -> str:
    return RELEASED_YAML.format(**{**SMALL, "text_vocab": TEXT_VOCAB})


def write_tiktoken(path: Path) -> Path:
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(RANKS)))
    return path


def reference_bpe(text: str) -> list[int]:
    """tiktoken's rule, written out: per pre-tokenized piece, merge the adjacent pair whose
    concatenation has the lowest rank (leftmost first) until no pair is a token."""
    rank = {token: i for i, token in enumerate(RANKS)}
    ids = []
    for piece in regex.findall(PATTERN, text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            pairs = [(rank.get(a + b, len(rank)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == len(rank):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [rank[p] for p in parts]
    return ids


def write_onnx_front_ends(root: Path) -> tuple[Path, Path]:
    """speech_tokenizer_v1.onnx (64 codes, 50 Hz) and campplus.onnx (192-dim) from tiny cosy models."""
    from cosy.speaker.extract import load_checkpoint as load_speaker
    from cosy.speaker.onnx import export_onnx as export_speaker
    from cosy.tokenizer.extract import load_checkpoint as load_tokenizer
    from cosy.tokenizer.onnx import export_onnx as export_tokenizer

    speaker = {**TINY["speaker"], "campplus": {**TINY["speaker"]["campplus"], "embedding_dim": 192}}
    dirs = write_random_experiments(root, "tiny", overrides={"speaker": speaker}, parts=("tokenizer", "speaker"))
    tokenizer = export_tokenizer(load_tokenizer(dirs["tokenizer"] / "model.safetensors"), root / "tok.onnx")
    campplus = root / "campplus.onnx"
    export_speaker(load_speaker(dirs["speaker"] / "model.safetensors"), campplus)
    return Path(tokenizer), campplus


def save_released(folder: Path, onnx: tuple[Path, Path], llm_state: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    if llm_state is None:
        llm_state = load_file(REF / "cosyvoice_v1_llm.small.state.safetensors")
        table = llm_state["text_embedding.weight"]
        extra = torch.randn(TEXT_VOCAB - table.shape[0], table.shape[1], generator=torch.Generator().manual_seed(0))
        llm_state["text_embedding.weight"] = torch.cat([table, extra])
    torch.save(llm_state, folder / "llm.pt")
    torch.save(load_file(REF / "cosyvoice_v1_flow.small.state.safetensors"), folder / "flow.pt")
    torch.save(load_file(REF / "cosyvoice_v1_hift.small.state.safetensors"), folder / "hift.pt")
    (folder / "cosyvoice.yaml").write_text(small_yaml())
    shutil.copy(onnx[0], folder / "speech_tokenizer_v1.onnx")
    shutil.copy(onnx[1], folder / "campplus.onnx")
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    onnx = write_onnx_front_ends(root / "front")
    return {"root": root, "onnx": onnx, "src": save_released(root / "CosyVoice-300M", onnx),
            "tiktoken": write_tiktoken(root / "multilingual.tiktoken")}


@pytest.fixture(scope="module")
def converted(released):
    out = released["root"] / "model"
    code = cli_main(["convert", "cosyvoice", str(released["src"]), str(out), "--tiktoken", str(released["tiktoken"])])
    assert code == 0
    return out, model_dir.load(out)


# ------------------------------------------------------------------------ text tokenizer


def test_whisper_bpe_follows_tiktoken_merges_and_whisper_special_ids(released):
    tokenizer = whisper_tokenizer(released["tiktoken"])
    assert tokenizer.vocab_size == TEXT_VOCAB == len(RANKS) + 1609
    texts = ["the thing is on the stage", "I'm reading theses, aren't we?  two  spaces\nline",
             "thethethe tthe   the", "Ünïcödé 1234 数字"]
    for text in texts:
        assert tokenizer.encode(text) == reference_bpe(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(" the") == [RANKS.index(b" the")]
    n = len(RANKS)
    assert tokenizer.encode("<|endoftext|><|startoftranscript|><|en|><|yue|>") == [n, n + 1, n + 2, n + 101]
    assert tokenizer.encode("<|notimestamps|><|0.00|><|30.00|>") == [n + 107, n + 108, TEXT_VOCAB - 1]
    assert tokenizer.encode("a<|zh|>the") == [ord("a"), n + 3, RANKS.index(b"the")]


def test_bad_tiktoken_files_are_named(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("dGg= 0\nnot-a-line\n")
    with pytest.raises(CosyError, match=r"bad.tiktoken:2"):
        whisper_tokenizer(bad)
    bad.write_text("dGg= 0\n")
    with pytest.raises(CosyError, match="single bytes"):
        whisper_tokenizer(bad)
    with pytest.raises(CosyError, match="not found"):
        whisper_tokenizer(tmp_path / "absent.tiktoken")


# ------------------------------------------------------------------- converted model dir


def test_model_dir_has_every_part_and_whisper_text_tokenizer(converted):
    out, parts = converted
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["tokenizer"] == "tokenizer/model.onnx" and config["speaker"] == "speaker/model.onnx"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["text_vocab"] == TEXT_VOCAB and manifest["speech_vocab"] == 64
    assert manifest["speaker_dim"] == 192 and manifest["sample_rate"] == 22050
    assert parts.text_tokenizer.encode("the <|en|>") == reference_bpe("the ") + [len(RANKS) + 2]
    assert Path(manifest["sources"]["llm"]).name == "llm.pt"
    assert "multilingual.tiktoken" in manifest["sources"]["text_tokenizer"]


def test_convert_keeps_voice_conversion_as_the_one_word_command(capsys):
    for argv, expected in ((["convert", "--help"], "--source-wav"), (["convert", "cosyvoice", "--help"], "SRC_DIR")):
        with pytest.raises(SystemExit):
            cli_main(argv)
        assert expected in capsys.readouterr().out


@torch.no_grad()
def test_converted_llm_reproduces_reference_logits_and_greedy_tokens(converted):
    llm = converted[1].llm
    io = load_file(REF / "cosyvoice_v1_llm.small.io.safetensors")
    text, text_len = io["in.train.text_token"].long(), io["in.train.text_token_len"].long()
    speech, speech_len = io["in.train.speech_token"].long(), io["in.train.speech_token_len"].long()
    x, lengths, _ = llm.assemble(llm.encode_text(text, text_len), text_len, llm.speaker(io["in.train.embedding"]),
                                 llm.speech_embedding(speech), speech_len)
    logits = llm.head(llm.hidden(x, lengths))
    assert (logits - io["out.train.logits"]).abs().max() < ATOL

    def item(name):
        tokens = io[name].long()
        return tokens, torch.tensor([tokens.size(1)])

    inputs = (*item("in.infer.text"), *item("in.infer.prompt_text"), *item("in.infer.prompt_speech_token"))
    decoder = Decoder(llm, *llm.prepare(*inputs, io["in.infer.embedding"]), capacity=40)
    steps = []
    for token in io["out.infer.tokens"].long():
        steps.append(decoder.logits()[0])
        decoder.push(token[None], torch.tensor([True]))
    assert (torch.stack(steps) - io["out.infer.step_logits"]).abs().max() < ATOL
    tokens = generate(llm, *inputs, io["in.infer.embedding"], sampling=SamplingConfig(greedy=True))[0]
    assert tokens[:5] == io["out.infer.tokens"].tolist()


@pytest.mark.parametrize("case", ["a", "b"])
@torch.no_grad()
def test_converted_flow_reproduces_reference_mel_with_recorded_noise(converted, case):
    io = load_file(REF / "cosyvoice_v1_flow.small.io.safetensors")
    mel = converted[1].flow.inference(io[f"in.{case}.token"], io[f"in.{case}.prompt_token"],
                                      io[f"in.{case}.prompt_feat"].transpose(1, 2), io[f"in.{case}.embedding"],
                                      noise=io[f"rng.{case}.00.randn_like"])
    assert mel.shape == io[f"out.{case}.mel"].shape
    assert (mel - io[f"out.{case}.mel"]).abs().max() < ATOL


@torch.no_grad()
def test_converted_hift_reproduces_reference_waveform(converted):
    vocoder = converted[1].vocoder  # loaded with weight norm folded, as for synthesis
    io = load_file(REF / "cosyvoice_v1_hift.small.io.safetensors")
    f0 = vocoder.predict_f0(io["in.mel"])
    assert (f0 - io["out.f0"]).abs().max() < ATOL
    draws = {"uniform": io["rng.infer.00.rand"].reshape(1, -1),
             "gaussian": io["rng.infer.01.randn_like"].transpose(1, 2)}  # v1 draws (batch, harmonics, samples)
    speech = vocoder.decode(io["in.mel"], vocoder.make_source(f0, **draws))
    assert speech.shape == io["out.speech"].shape
    assert (speech - io["out.speech"]).abs().max() < ATOL


@torch.no_grad()
def test_old_weight_norm_names_and_generator_prefix_in_hift_pt(released, converted, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(released["src"], src)
    old = {}
    for name, tensor in load_file(REF / "cosyvoice_v1_hift.small.state.safetensors").items():
        name = name.replace("parametrizations.weight.original0", "weight_g")
        old["generator." + name.replace("parametrizations.weight.original1", "weight_v")] = tensor
    assert any(name.endswith("weight_g") for name in old)
    torch.save(old, src / "hift.pt")
    args = ["convert", "cosyvoice", str(src), str(tmp_path / "out"), "--tiktoken", str(released["tiktoken"])]
    assert cli_main(args) == 0
    mel = load_file(REF / "cosyvoice_v1_hift.small.io.safetensors")["in.mel"]
    vocoder = model_dir.load(tmp_path / "out").vocoder
    assert torch.equal(vocoder.predict_f0(mel), converted[1].vocoder.predict_f0(mel))


def test_synthesize_runs_on_the_converted_dir(converted, tmp_path):
    samples, rate = synthetic_prompt(2.0)
    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, samples, rate)
    wav = tmp_path / "out.wav"
    code = cli_main(["synthesize", "--model-dir", str(converted[0]), "--text", "the thing is on the stage",
                     "--prompt-wav", str(prompt), "--out", str(wav), "--seed", "0"])
    assert code == 0
    audio, out_rate = sf.read(wav)
    assert out_rate == 22050 and len(audio) > 0 and len(audio) % 256 == 0
    assert abs(audio).max() > 0


# -------------------------------------------------------------------------------- errors


def test_missing_and_left_over_tensors_are_listed(released, tmp_path, capsys):
    state = load_file(REF / "cosyvoice_v1_llm.small.state.safetensors")
    state["text_embedding.weight"] = torch.zeros(TEXT_VOCAB, state["text_embedding.weight"].shape[1])
    del state["llm_decoder.bias"]
    state["llm.encoders.9.bogus"] = torch.zeros(1)
    state["unknown.weight"] = torch.zeros(1)
    src = save_released(tmp_path / "src", released["onnx"], state)
    out = tmp_path / "out"
    code = cli_main(["convert", "cosyvoice", str(src), str(out), "--tiktoken", str(released["tiktoken"])])
    message = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert "llm.pt" in message and "missing (cosy names): head.bias" in message
    assert "left over: llm.encoders.9.bogus, unknown.weight" in message


def test_wrong_shape_missing_file_and_other_architectures_are_named(released, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(released["src"], src)
    state = load_file(REF / "cosyvoice_v1_hift.small.state.safetensors")
    state["conv_post.bias"] = torch.zeros(3)
    torch.save(state, src / "hift.pt")
    args = ["convert", "cosyvoice", str(src), str(tmp_path / "out"), "--tiktoken", str(released["tiktoken"])]
    assert cli_main(args) == 1
    assert "hift.pt" in (err := capsys.readouterr().err) and "wrong shape: conv_post.bias (3,)" in err
    text = small_yaml()
    (src / "cosyvoice.yaml").write_text(text.replace("macaron_style: False", "macaron_style: True", 1))
    assert cli_main(args) == 1
    assert "'llm.text_encoder.macaron_style' is True" in capsys.readouterr().err
    (src / "cosyvoice.yaml").write_text(text.replace("cosyvoice.llm.llm.TransformerLM", "cosyvoice.llm.llm.Qwen2LM"))
    assert cli_main(args) == 1
    assert "Qwen2LM" in (err := capsys.readouterr().err) and "CosyVoice v1" in err
    (src / "campplus.onnx").unlink()
    assert cli_main(args) == 1
    assert "missing campplus.onnx" in capsys.readouterr().err
    assert cli_main(["convert", "cosyvoice", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_released_hyperpyyaml_is_read_without_running_its_tags(tmp_path):
    path = tmp_path / "cosyvoice.yaml"
    path.write_text(small_yaml())
    data = read_released_yaml(path)
    assert data["llm"]["__class__"] == "cosyvoice.llm.llm.TransformerLM"
    assert data["llm"]["text_encoder_input_size"] == 48 and data["hift"]["sampling_rate"] == 22050
    assert data["flow"]["decoder"]["cfm_params"]["inference_cfg_rate"] == 0.7
    assert data["__set_seed1"] == [1986]  # a tagged call stays plain data
    path.write_text(small_yaml().replace("!ref <spk_embed_dim>", "!ref <speaker_dim>", 1))
    with pytest.raises(CosyError, match="speaker_dim"):
        read_released_yaml(path)


# ---------------------------------------------------------------------------- full size


def _listing(name: str) -> dict[str, torch.Tensor]:
    rows = (REF / "keys" / f"cosyvoice_v1_{name}.keys.tsv").read_text().splitlines()[1:]
    return {key: torch.empty(*(int(d) for d in shape.split("x")), device="meta")
            for key, shape, *_ in (row.split("\t") for row in rows)}


def test_full_size_released_yaml_maps_every_listed_tensor(tmp_path):
    """The published recipe's sizes, read by the converter, give models that take every
    tensor of the full-size listings through the converter's map (shapes only)."""
    path = tmp_path / "cosyvoice.yaml"
    path.write_text(RELEASED_YAML.format(**FULL))
    parts = targets(read_released_yaml(path), str(path))
    for part, name, count in (("llm", "llm", 401), ("flow", "flow", 1185), ("vocoder", "hift", 227)):
        _, model, rename = parts[part]
        listing = _listing(name)
        assert len(map_state(listing, rename, model, name)) == len(listing) == count
    llm = parts["llm"][1]
    assert sum(p.numel() for p in llm.parameters()) > 300e6
