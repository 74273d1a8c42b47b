"""Model directories: one folder that fully describes a trained system.

    DIR/config.yaml        ModelDirConfig: the file of each part, synthesis settings
    DIR/manifest.json      sample rate, token rate, mel settings, cosy version, sources
    DIR/tokenizer.json     the text tokenizer
    DIR/<part>/config.yaml the part's experiment config (`task` and `model` sections)
    DIR/<part>/model.safetensors (or model.onnx for the tokenizer and speaker encoder)

with <part> one of tokenizer, speaker, llm, flow, vocoder. Each part folder is laid out
like an experiment dir, so the packages' own loaders read it. `pack` assembles a
directory from experiment dirs; `load` reads one back and checks that the parts fit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cosy import __version__
from cosy import config as cfgio
from cosy.checkpoint import CONFIG, find_experiment_config, load_weights, model_section, read_experiment, read_weights
from cosy.errors import CosyError
from cosy.train.checkpoint import Checkpoints, save_weights
from cosy.vocoder.adapt import LEARNING_RATE

PARTS = ("tokenizer", "speaker", "llm", "flow", "vocoder")
ONNX_PARTS = ("tokenizer", "speaker")
AVERAGED = "model.safetensors"


@dataclass
class SynthesisConfig:
    """How text and prompts are turned into speech (the `synthesis:` section).

    lang: language of the text for normalisation and sentence splitting ("auto": detect).
    pause_seconds: silence between the sentences of a long text.
    min/max_prompt_seconds: shorter prompts are refused, longer ones trimmed.
    batch_size: sentences decoded together by the LM.
    stream_chunk_tokens: with a non-causal flow decoder, streaming re-decodes all tokens
        once this many new tokens have come and emits the new frames except the last
        `stream_holdback_tokens` tokens' worth, which still lack right context; the chunk
        then grows by `stream_chunk_growth` (which bounds the total cost).
    prompt_warp_semitones: 0 (off), or the search range of a frequency warp (pitch and
        formants together) of the flow decoder's mel that matches its long-term spectrum to
        the prompt's, applied before the vocoder: a vocal-tract-length correction for voices
        that the decoder pulls toward its training voices (`cosy.audio.matching_warp`; a
        best factor at the range's limit gives no warp). Streaming fixes the warp on the
        first chunk.
    vocoder_adapt_steps: 0 (off), or the training steps that fit a copy of the vocoder to
        each prompt's recording before it speaks in that voice (`cosy.vocoder.adapt`), at
        learning rate `vocoder_adapt_lr`. It costs about 0.15 s a step on 2 CPU cores for the mini
        recipe's vocoder and is done once per prompt.
    """

    lang: str = "auto"
    pause_seconds: float = 0.2
    min_prompt_seconds: float = 1.0
    max_prompt_seconds: float = 30.0
    batch_size: int = 8
    stream_chunk_tokens: int = 25
    stream_holdback_tokens: int = 5
    stream_chunk_growth: float = 2.0
    prompt_warp_semitones: float = 0.0
    vocoder_adapt_steps: int = 0
    vocoder_adapt_lr: float = LEARNING_RATE

    def check(self) -> None:
        """CosyError naming the first setting out of its range."""
        rules = [("lang", self.lang in ("auto", "en", "zh"), "auto, en or zh"),
                 ("pause_seconds", self.pause_seconds >= 0, ">= 0"),
                 ("min_prompt_seconds", self.min_prompt_seconds > 0, "> 0"),
                 ("max_prompt_seconds", self.max_prompt_seconds >= self.min_prompt_seconds, ">= min_prompt_seconds"),
                 ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("stream_chunk_tokens", self.stream_chunk_tokens >= 1, ">= 1"),
                 ("stream_holdback_tokens", self.stream_holdback_tokens >= 0, ">= 0"),
                 ("stream_chunk_growth", self.stream_chunk_growth >= 1, ">= 1"),
                 # the search steps by 0.1 and a factor at its limit gives none: less than 0.2 would do nothing
                 ("prompt_warp_semitones", self.prompt_warp_semitones == 0 or 0.2 <= self.prompt_warp_semitones <= 12,
                  "0 or in [0.2, 12]"),
                 ("vocoder_adapt_steps", self.vocoder_adapt_steps >= 0, ">= 0"),
                 ("vocoder_adapt_lr", self.vocoder_adapt_lr > 0, "> 0")]
        for name, ok, rule in rules:
            if not ok:
                raise CosyError(f"synthesis.{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class ModelDirConfig:
    """DIR/config.yaml: the weights file of each part, relative to DIR."""

    tokenizer: str = "tokenizer/model.safetensors"
    speaker: str = "speaker/model.safetensors"
    llm: str = "llm/model.safetensors"
    flow: str = "flow/model.safetensors"
    vocoder: str = "vocoder/model.safetensors"
    text_tokenizer: str = "tokenizer.json"
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)


@dataclass
class Parts:
    """The loaded models of a system, ready for `cosy.inference.pipeline.CosyTTS`."""

    tokenizer: Any          # cosy.tokenizer.extract TorchBackend or OnnxBackend
    speaker: Any            # cosy.speaker.extract TorchEncoder or OnnxEncoder
    llm: Any                # cosy.llm.LLM
    flow: Any               # cosy.flow.FlowModel
    vocoder: Any            # cosy.vocoder.hifigan.Generator
    vocoder_config: Any     # cosy.vocoder.model.VocoderConfig: the losses that fit it to a prompt
    text_tokenizer: Any     # cosy.text.bpe.TextTokenizer
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)


# ------------------------------------------------------------------------------ pack


def resolve_source(part: str, source: str | Path) -> tuple[Path, Path | None]:
    """(weights file, experiment config or None for ONNX) of an experiment dir or a file.

    A dir gives DIR/model.safetensors when present (`cosy average ... --out`), else the
    best checkpoint of its index by validation loss, else the latest one.
    """
    source = Path(source)
    flag = f"--{part}"
    if source.is_dir():
        config = source / "config.yaml"
        if not config.is_file():
            raise CosyError(f"{flag} {source}: no config.yaml in this experiment dir")
        if (source / AVERAGED).is_file():
            return source / AVERAGED, config
        index = Checkpoints(source)
        entry = (index.best(1) or [index.latest()])[0]
        if entry is None:
            raise CosyError(f"{flag} {source}: neither {AVERAGED} nor any indexed checkpoint")
        return source / entry.weights, config
    if not source.is_file():
        raise CosyError(f"{flag} {source}: no such file or directory")
    if source.suffix == ".onnx":
        if part not in ONNX_PARTS:
            raise CosyError(f"{flag} {source}: only the tokenizer and speaker encoder may be ONNX files")
        return source, None
    try:
        return source, find_experiment_config(source)
    except CosyError as err:
        raise CosyError(f"{flag}: {err}") from err


def _part_config(part: str, config: Path, folder: Path) -> dict:
    """The `task` and `model` sections of an experiment config, made self-contained."""
    try:
        model = model_section(config, part)
    except CosyError as err:
        raise CosyError(f"--{part}: {err}") from err
    if part == "tokenizer":
        model.pop("adversary", None)  # training only, with a training-time speaker list
    if part == "llm":
        model["tokenizer"] = ""  # training-time path; the model dir carries its own tokenizer.json
        if model.get("backbone") == "hf":
            hf_config = Path(model.get("hf_dir", "")) / "config.json"
            if not hf_config.is_file():
                raise CosyError(f"--llm: {config}: no Hugging Face config.json in model.hf_dir")
            (folder / "hf").mkdir()
            shutil.copy(hf_config, folder / "hf" / "config.json")
            model["hf_dir"] = "hf"
    return {"task": part, "model": model}


def _copy_weights(part: str, weights: Path, target: Path, half: bool = False) -> None:
    """Copy the inference weights: the trainer's checkpoints also hold training-only
    submodules (speaker classifier, vocoder discriminator, and what a task lists as
    `training_only`, such as the tokenizer's speaker adversary) that are dropped here.
    With `half`, floating-point tensors are stored as float16 (loading casts them back)."""
    from cosy.train.tasks import get_task

    keep = {"speaker": "encoder.", "vocoder": "generator."}.get(part)
    drop = get_task(part).training_only
    if keep is None and not drop and not half:
        shutil.copy(weights, target)
        return
    try:
        state = read_weights(weights, keep)
    except CosyError as err:
        raise CosyError(f"--{part}: {err}") from err
    if drop:
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_weights(target, state)


def pack(sources: dict[str, str | Path], text_tokenizer: str | Path, out: str | Path,
         synthesis: SynthesisConfig | None = None, half: bool = False) -> Path:
    """Assemble a model dir at `out` from one source per part (see `resolve_source`).

    The result is loaded once (which checks that the parts fit) before it replaces `out`,
    so a failed pack leaves nothing behind.
    """
    out = Path(out)
    missing = [p for p in PARTS if p not in sources]
    if missing:
        raise CosyError(f"pack: missing part(s): {', '.join('--' + p for p in missing)}")
    if not Path(text_tokenizer).is_file():
        raise CosyError(f"--text-tokenizer: file not found: {text_tokenizer}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CosyError(f"--out {out}: exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        files, origin = {}, {}
        for part in PARTS:
            weights, config = resolve_source(part, sources[part])
            folder = staging / part
            folder.mkdir()
            if config is None:
                target = folder / "model.onnx"
                shutil.copy(weights, target)
            else:
                target = folder / "model.safetensors"
                (folder / "config.yaml").write_text(yaml.safe_dump(_part_config(part, config, folder),
                                                                   sort_keys=False))
                _copy_weights(part, weights, target, half)
            files[part] = str(target.relative_to(staging))
            origin[part] = str(weights.resolve())
        shutil.copy(text_tokenizer, staging / "tokenizer.json")
        origin["text_tokenizer"] = str(Path(text_tokenizer).resolve())
        cfg = ModelDirConfig(**files, synthesis=synthesis or SynthesisConfig())
        (staging / "config.yaml").write_text(cfgio.dumps(cfg))
        parts = load(staging)
        (staging / "manifest.json").write_text(json.dumps(manifest(parts, origin), indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def manifest(parts: Parts, sources: dict[str, str]) -> dict:
    return {
        "cosy_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sample_rate": parts.vocoder.mel.sample_rate,
        "token_rate": parts.flow.cfg.token_rate,
        "mel": dataclasses.asdict(parts.flow.cfg.mel),
        "speech_vocab": parts.llm.cfg.speech_vocab,
        "speaker_dim": parts.speaker.embedding_dim,
        "text_vocab": parts.text_tokenizer.vocab_size,
        "sources": sources,
    }


# ------------------------------------------------------------------------------ load


def load(directory: str | Path, device: str = "cpu") -> Parts:
    """Load every part of model dir `directory` and check that they fit together."""
    directory = Path(directory)
    config_path = directory / "config.yaml"
    if not config_path.is_file():
        raise CosyError(f"model dir {directory}: no config.yaml (is this a model directory made by `cosy pack`?)")
    cfg = cfgio.load(ModelDirConfig, config_path)
    from cosy.speaker.extract import load_speaker_encoder
    from cosy.text.bpe import TextTokenizer
    from cosy.tokenizer.extract import load_tokenizer
    from cosy.vocoder.loading import load_generator

    def path(part: str) -> Path:
        file = directory / getattr(cfg, part)
        if not file.is_file():
            raise CosyError(f"model dir {directory}: the {part} file {file} is missing")
        return file

    vocoder, vocoder_config = load_generator(path("vocoder"))
    parts = Parts(
        tokenizer=load_tokenizer(path("tokenizer"), device),
        speaker=load_speaker_encoder(path("speaker"), device),
        llm=_load_llm(path("llm"), device),
        flow=_load_flow(path("flow"), device),
        vocoder=vocoder.to(device),
        vocoder_config=vocoder_config,
        text_tokenizer=TextTokenizer.load(path("text_tokenizer")),
        synthesis=cfg.synthesis,
    )
    check_parts(parts, str(directory))
    return parts


def _load_llm(path: Path, device: str):
    from cosy.llm import LLM, LLMConfig

    cfg, state, config = read_experiment(path, "llm", LLMConfig, path.parent / CONFIG)
    if cfg.backbone == "hf":
        cfg.hf_dir = str(path.parent / cfg.hf_dir)
    return load_weights(LLM(cfg), state, path, config).to(device).eval()


def _load_flow(path: Path, device: str):
    from cosy.flow import FlowConfig, FlowModel
    from cosy.flow.checkpoint import load_state

    cfg, state, config = read_experiment(path, "flow", FlowConfig, path.parent / CONFIG)
    return load_state(FlowModel(cfg), state, path, config).to(device).eval()


def text_vocab(llm) -> int:
    """Rows of the LM's text embedding (its own table, or the Hugging Face backbone's)."""
    if llm.cfg.backbone == "hf":
        return llm.lm.model.get_input_embeddings().num_embeddings
    return llm.cfg.text_vocab


def speech_vocab(tokenizer) -> int | None:
    """Codebook size of a speech tokenizer backend (None for ONNX files, which do not say)."""
    model = getattr(tokenizer, "model", None)
    return None if model is None else int(model.quantizer.codebook_size)


def check_parts(parts: Parts, where: str) -> None:
    """CosyError naming the part that disagrees with the others."""
    llm, flow, vocoder = parts.llm.cfg, parts.flow.cfg, parts.vocoder
    codes = speech_vocab(parts.tokenizer)
    if codes is not None and codes != llm.speech_vocab:
        raise CosyError(f"model dir {where}: the speech tokenizer has {codes} codes but the LLM "
                        f"(llm/config.yaml model.speech_vocab) expects {llm.speech_vocab}")
    if flow.vocab_size < llm.speech_vocab:
        raise CosyError(f"model dir {where}: the flow decoder embeds {flow.vocab_size} speech tokens "
                        f"(flow/config.yaml model.vocab_size) but the LLM produces {llm.speech_vocab}")
    token_rate = parts.tokenizer.mel.sample_rate / parts.tokenizer.mel.hop_length / parts.tokenizer.rate_factor
    if abs(token_rate - flow.token_rate) > 1e-6:
        raise CosyError(f"model dir {where}: the speech tokenizer makes {token_rate:g} tokens/s but the flow "
                        f"decoder (flow/config.yaml model.token_rate) expects {flow.token_rate:g}")
    dim = parts.speaker.embedding_dim
    if parts.llm.uses_speaker and llm.spk_embed_dim != dim:
        raise CosyError(f"model dir {where}: the speaker encoder gives {dim}-dim embeddings but the LLM "
                        f"(llm/config.yaml model.spk_embed_dim) expects {llm.spk_embed_dim}")
    if flow.spk_dim != dim:
        raise CosyError(f"model dir {where}: the speaker encoder gives {dim}-dim embeddings but the flow "
                        f"decoder (flow/config.yaml model.spk_dim) expects {flow.spk_dim}")
    if flow.mel != vocoder.mel:
        diff = [f.name for f in dataclasses.fields(flow.mel) if getattr(flow.mel, f.name) != getattr(vocoder.mel, f.name)]
        raise CosyError(f"model dir {where}: the vocoder's mel settings (vocoder/config.yaml model.mel) differ "
                        f"from the flow decoder's in {', '.join(diff)}")
    if parts.text_tokenizer.vocab_size > text_vocab(parts.llm):
        raise CosyError(f"model dir {where}: the text tokenizer has {parts.text_tokenizer.vocab_size} tokens "
                        f"but the LLM (llm/config.yaml model.text_vocab) embeds {text_vocab(parts.llm)}")


# --------------------------------------------------------------------- `cosy pack`


def add_arguments(parser) -> None:
    for part in PARTS:
        onnx = " or an ONNX file" if part in ONNX_PARTS else ""
        parser.add_argument(f"--{part}", required=True,
                            help=f"experiment dir, or weights file with config.yaml beside it{onnx}")
    parser.add_argument("--text-tokenizer", required=True, help="the text tokenizer.json the LLM was trained with")
    parser.add_argument("--out", required=True, help="new model directory (must not exist or be empty)")
    parser.add_argument("--half", action="store_true",
                        help="store the PyTorch parts' weights as float16 (half the size; computed in float32)")
    parser.add_argument("--synthesis", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="synthesis: settings of the model dir (e.g. prompt_warp_semitones=4)")


def run(args) -> int:
    bad = [item for item in args.synthesis if "=" not in item]
    if bad:
        raise CosyError(f"--synthesis {bad[0]}: expected KEY=VALUE, e.g. prompt_warp_semitones=4")
    overrides = [f"synthesis.{item}" for item in args.synthesis]
    synthesis = cfgio.from_dict(SynthesisConfig, cfgio.apply_overrides({}, overrides).get("synthesis", {}),
                                "synthesis")
    synthesis.check()
    out = pack({part: getattr(args, part) for part in PARTS}, args.text_tokenizer, args.out, synthesis, args.half)
    print(f"wrote model dir {out}")
    return 0
