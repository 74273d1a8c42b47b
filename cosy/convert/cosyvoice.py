"""`cosy convert cosyvoice SRC OUT`: a released CosyVoice v1 directory as a cosy model dir.

SRC holds llm.pt, flow.pt, hift.pt (PyTorch state dicts, read with
`torch.load(weights_only=True)`, so nothing but tensors is ever unpickled),
campplus.onnx, speech_tokenizer_v1.onnx and cosyvoice.yaml. The yaml is a hyperpyyaml
file; it is read with a safe loader that turns every `!new:`/`!name:` tag into a plain
mapping (its class path kept under `__class__`) and resolves `!ref <key>` against the
top-level keys, so no code named in the file is imported. Only the sizes are taken from
it; they must describe the v1 architecture, else a CosyError names the key.

Each state dict goes through its package's explicit name map (`cosy.llm.convert`,
`cosy.flow.checkpoint`, `cosy.vocoder.cosyvoice`); the result must hold exactly the
tensors of the cosy model built from those sizes, else a CosyError lists every missing,
left-over and misshapen tensor. The text tokenizer is Whisper's multilingual BPE
(`cosy.text.whisper_bpe`). Everything is assembled with `cosy.inference.model_dir.pack`,
which loads the result once before it appears at OUT.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from cosy.audio import MelConfig
from cosy.errors import CosyError

FILES = {"llm": "llm.pt", "flow": "flow.pt", "vocoder": "hift.pt", "speaker": "campplus.onnx",
         "tokenizer": "speech_tokenizer_v1.onnx", "config": "cosyvoice.yaml"}


# --------------------------------------------------------------------------- the yaml


class _Ref(str):
    """A `!ref <key>` placeholder, resolved once the whole file is read."""


class _TagIgnoringLoader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        if suffix.endswith("omegaconf.DictConfig"):
            return value.get("content", value)
        return {"__class__": suffix.split(":", 1)[-1], **value}
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    return _Ref(value.strip().strip("<>")) if suffix == "ref" else value


_TagIgnoringLoader.add_multi_constructor("!", _construct_tagged)


def _resolve(value: Any, top: dict, path: Path) -> Any:
    if isinstance(value, _Ref):
        if str(value) not in top:
            raise CosyError(f"{path}: '!ref <{value}>' names no top-level key")
        return top[str(value)]
    if isinstance(value, dict):
        return {k: _resolve(v, top, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, path) for v in value]
    return value


def read_released_yaml(path: str | Path) -> dict:
    """cosyvoice.yaml as plain data (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CosyError(f"{path}: file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagIgnoringLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CosyError(f"{path}: not a readable yaml file: {err}") from err
    if not isinstance(data, dict):
        raise CosyError(f"{path}: expected a mapping at the top level")
    return _resolve(data, data, path)


class _Section:
    """One mapping of the yaml; `get` names the full key path in its errors."""

    def __init__(self, data: Any, key: str, source: str, classes: tuple[str, ...] = ()):
        if not isinstance(data, dict):
            raise CosyError(f"{source}: key '{key}' is missing or not a mapping")
        cls = str(data.get("__class__", ""))
        if classes and cls.rsplit(".", 1)[-1] not in classes:
            raise CosyError(f"{source}: '{key}' is {cls or 'untyped'}; cosy converts "
                            f"{' / '.join(classes)} (CosyVoice v1) only")
        self.data, self.key, self.source = data, key, source

    def get(self, name: str, default: Any = ..., expect: Any = ...) -> Any:
        if name not in self.data and default is ...:
            raise CosyError(f"{self.source}: key '{self.key}.{name}' is missing")
        value = self.data.get(name, default)
        if expect is not ... and value != expect:
            raise CosyError(f"{self.source}: '{self.key}.{name}' is {value!r}; the v1 architecture "
                            f"cosy converts has {expect!r}")
        return value

    def sub(self, name: str, classes: tuple[str, ...] = ()) -> "_Section":
        return _Section(self.data.get(name), f"{self.key}.{name}", self.source, classes)


def _encoder(section: _Section, layer: str):
    """EncoderConfig of a WeNet-style Conformer/Transformer encoder section."""
    from cosy.modules import EncoderConfig

    section.get("pos_enc_layer_type", expect="rel_pos_espnet")
    section.get("selfattention_layer_type", "rel_selfattn", expect="rel_selfattn")
    section.get("normalize_before", True, expect=True)
    section.get("use_cnn_module", False, expect=False)
    section.get("macaron_style", False, expect=False)
    section.get("use_dynamic_chunk", False, expect=False)
    chunk = int(section.get("static_chunk_size", 0))
    return EncoderConfig(input_size=section.get("input_size"), d_model=section.get("output_size"),
                         n_heads=section.get("attention_heads"), ffn_dim=section.get("linear_units"),
                         n_layers=section.get("num_blocks"), dropout=section.get("dropout_rate", 0.1),
                         positional_dropout=section.get("positional_dropout_rate", 0.1),
                         attention_dropout=section.get("attention_dropout_rate", 0.0),
                         input_layer=section.get("input_layer"), layer=layer, pos_enc="rel_pos",
                         causal=chunk == 1, chunk_size=chunk if chunk > 1 else 0)


def llm_config(data: dict, source: str):
    """LLMConfig of the yaml's `llm` section (TransformerLM)."""
    from cosy.llm import LLMConfig, SamplingConfig

    llm = _Section(data.get("llm"), "llm", source, ("TransformerLM",))
    sampling = SamplingConfig()
    if isinstance(llm.data.get("sampling"), dict):
        ras = llm.sub("sampling")
        sampling = SamplingConfig(top_p=ras.get("top_p", sampling.top_p), top_k=ras.get("top_k", sampling.top_k),
                                  window=ras.get("win_size", sampling.window), tau=ras.get("tau_r", sampling.tau))
    return LLMConfig(text_vocab=llm.get("text_token_size"), text_embed_dim=llm.get("text_encoder_input_size"),
                     text_encoder=_encoder(llm.sub("text_encoder", ("ConformerEncoder",)), "conformer"),
                     lm=_encoder(llm.sub("llm", ("TransformerEncoder",)), "transformer"),
                     speech_vocab=llm.get("speech_token_size"), spk_embed_dim=llm.get("spk_embed_dim"),
                     label_smoothing=float(llm.get("lsm_weight", 0.0)),
                     length_normalized_loss=bool(llm.get("length_normalized_loss", True)), sampling=sampling)


def flow_config(data: dict, source: str):
    """FlowConfig of the yaml's `flow` section (MaskedDiffWithXvec)."""
    from cosy.flow import FlowConfig
    from cosy.flow.cfm import CFMConfig
    from cosy.flow.estimator import EstimatorConfig

    flow = _Section(data.get("flow"), "flow", source, ("MaskedDiffWithXvec",))
    mel = MelConfig.v1()
    flow.get("output_size", expect=mel.n_mels)
    encoder = _encoder(flow.sub("encoder", ("ConformerEncoder",)), "conformer")
    flow.get("input_size", expect=encoder.input_size)
    regulator = flow.sub("length_regulator", ("InterpolateRegulator",))
    regulator.get("channels", expect=mel.n_mels)
    ratios = regulator.get("sampling_ratios")
    decoder = flow.sub("decoder", ("ConditionalCFM",))
    decoder.get("spk_emb_dim", expect=mel.n_mels)
    params = decoder.sub("cfm_params")
    params.get("solver", "euler", expect="euler")
    estimator = decoder.sub("estimator", ("ConditionalDecoder",))
    estimator.get("in_channels", expect=4 * mel.n_mels)
    estimator.get("out_channels", expect=mel.n_mels)
    estimator.get("act_fn", expect="gelu")
    return FlowConfig(
        vocab_size=flow.get("vocab_size"), token_rate=float(flow.get("input_frame_rate")), mel=mel,
        spk_dim=flow.get("spk_embed_dim"), encoder=encoder, regulator_convs=len(ratios),
        estimator=EstimatorConfig(channels=list(estimator.get("channels")), n_blocks=estimator.get("n_blocks"),
                                  n_mid_blocks=estimator.get("num_mid_blocks"), heads=estimator.get("num_heads"),
                                  head_dim=estimator.get("attention_head_dim")),
        cfm=CFMConfig(sigma_min=float(params.get("sigma_min")), cfg_dropout=float(params.get("training_cfg_rate")),
                      guidance=float(params.get("inference_cfg_rate")), schedule=params.get("t_scheduler")))


def vocoder_config(data: dict, source: str):
    """VocoderConfig of the yaml's `hift` section (HiFTGenerator at 22.05 kHz)."""
    from cosy.vocoder.cosyvoice import hift_config
    from cosy.vocoder.model import VocoderConfig

    hift = _Section(data.get("hift"), "hift", source, ("HiFTGenerator",))
    generator, mel = hift_config(1, base_channels=hift.get("base_channels"),
                                 f0_channels=hift.sub("f0_predictor").get("cond_channels"))
    src = generator.source
    expected = {"in_channels": mel.n_mels, "sampling_rate": mel.sample_rate, "nb_harmonics": src.harmonics,
                "nsf_alpha": src.sine_amp, "nsf_sigma": src.noise_std,
                "nsf_voiced_threshold": src.voiced_threshold, "upsample_rates": generator.upsample_rates,
                "upsample_kernel_sizes": generator.upsample_kernels,
                "resblock_kernel_sizes": generator.resblock_kernels,
                "resblock_dilation_sizes": generator.resblock_dilations,
                "source_resblock_kernel_sizes": src.resblock_kernels,
                "source_resblock_dilation_sizes": src.resblock_dilations,
                "istft_params": {"n_fft": generator.istft_n_fft, "hop_len": generator.istft_hop}}
    for key, value in expected.items():
        hift.get(key, expect=value)
    return VocoderConfig(mel=mel, generator=generator)


# ------------------------------------------------------------------------- the weights


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A released .pt state dict; only tensors are unpickled."""
    if not path.is_file():
        raise CosyError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files and forbidden pickled objects raise many types
        raise CosyError(f"{path}: not a state dict of tensors ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CosyError(f"{path}: not a state dict of tensors")
    return state


def _listing(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")


def map_state(state: dict[str, torch.Tensor], rename: Callable[[str], str], model: torch.nn.Module,
              source: str) -> dict[str, torch.Tensor]:
    """`state` under cosy's names; CosyError listing every tensor that does not fit `model`."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mapped, left_over = {}, []
    for name, tensor in state.items():
        try:
            new = rename(name)
        except CosyError:
            new = None
        if new is None or new not in expected or new in mapped:
            left_over.append(name)
        else:
            mapped[new] = tensor
    missing = sorted(set(expected) - set(mapped))
    misshapen = [f"{name} {tuple(t.shape)} (expected {expected[name]})"
                 for name, t in mapped.items() if tuple(t.shape) != expected[name]]
    problems = [f"{label}: {_listing(names)}" for label, names in
                (("missing (cosy names)", missing), ("left over", left_over), ("wrong shape", misshapen)) if names]
    if problems:
        raise CosyError(f"{source} does not fit the sizes in cosyvoice.yaml: " + "; ".join(problems))
    return mapped


def targets(data: dict, source: str) -> dict[str, tuple[Any, torch.nn.Module, Callable[[str], str]]]:
    """Part -> (cosy config, its model on the meta device, reference-to-cosy name map)
    for the llm, flow and vocoder sizes of the parsed cosyvoice.yaml `data`."""
    from cosy.flow import FlowModel
    from cosy.flow.checkpoint import reference_to_cosy
    from cosy.llm import LLM
    from cosy.llm.convert import rename_v1_llm_key
    from cosy.vocoder.cosyvoice import reference_name
    from cosy.vocoder.hifigan import Generator

    llm, flow, vocoder = llm_config(data, source), flow_config(data, source), vocoder_config(data, source)
    kernels = len(vocoder.generator.resblock_kernels)
    with torch.device("meta"):  # names and shapes only: no allocation at the released sizes
        return {"llm": (llm, LLM(llm), rename_v1_llm_key),
                "flow": (flow, FlowModel(flow), lambda name: reference_to_cosy(name, flow.regulator_convs)),
                "vocoder": (vocoder, Generator(vocoder.generator, vocoder.mel),
                            lambda name: reference_name(name, kernels))}


def convert_weights(src: Path, data: dict) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
    """Part -> (config, cosy state dict) for the llm, flow and vocoder of `src`."""
    out = {}
    for part, (cfg, model, rename) in targets(data, str(src / FILES["config"])).items():
        path = src / FILES[part]
        out[part] = (cfg, map_state(read_state(path), rename, model, str(path)))
    return out


# ------------------------------------------------------------------------ the model dir


def convert(src: str | Path, out: str | Path, tiktoken: str | Path | None = None) -> Path:
    """Write the cosy model dir `out` for the released CosyVoice v1 directory `src`."""
    from cosy.inference.model_dir import pack
    from cosy.text.whisper_bpe import installed_vocabulary, whisper_tokenizer
    from cosy.train.checkpoint import save_weights

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CosyError(f"SRC_DIR {src}: not a directory")
    absent = [name for name in FILES.values() if not (src / name).is_file()]
    if absent:
        raise CosyError(f"SRC_DIR {src}: missing {', '.join(absent)}")
    data = read_released_yaml(src / FILES["config"])
    parts = convert_weights(src, data)
    text_tokenizer = whisper_tokenizer(tiktoken or installed_vocabulary())
    with tempfile.TemporaryDirectory(prefix="cosy-convert-") as tmp:
        staging = Path(tmp)
        sources: dict[str, Path] = {"tokenizer": src / FILES["tokenizer"], "speaker": src / FILES["speaker"]}
        for part, (cfg, state) in parts.items():
            folder = staging / part
            folder.mkdir()
            section = {"task": part, "model": dataclasses.asdict(cfg)}
            (folder / "config.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
            save_weights(folder / "model.safetensors", state)
            sources[part] = folder
        text_tokenizer.save(staging / "tokenizer.json")
        pack(sources, staging / "tokenizer.json", out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sources"] = {part: str((src / FILES[part]).resolve()) for part in sources}
    manifest["sources"]["text_tokenizer"] = text_tokenizer.source
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC_DIR", help="released CosyVoice-300M directory (llm.pt, flow.pt, "
                        "hift.pt, campplus.onnx, speech_tokenizer_v1.onnx, cosyvoice.yaml)")
    parser.add_argument("out", metavar="OUT_DIR", help="new cosy model directory (must not exist or be empty)")
    parser.add_argument("--tiktoken", default=None,
                        help="Whisper's multilingual.tiktoken (default: the one of an installed openai-whisper)")


def run(args) -> int:
    out = convert(args.src, args.out, args.tiktoken)
    print(f"wrote model dir {out}")
    return 0
