"""Zero-shot synthesis: `CosyTTS`.

    text -> sentences -> normalise -> text ids --\
    prompt wav -> speaker embedding -------------+-> LM -> speech tokens
    prompt wav -> speech tokens (+ prompt text) -/            |
    speech tokens + speaker + prompt mel -> flow -> mel -> vocoder -> wav

With a prompt transcript, the transcript's ids and the prompt's speech tokens prefix the
LM (zero-shot continuation); without one the LM sees only the speaker embedding and the
prompt reaches the output through the flow decoder (cross-lingual style).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from cosy.audio import load_audio, matching_warp, mel_spectrogram, resample, warp_mel, whisper_log_mel
from cosy.errors import CosyError
from cosy.inference.model_dir import Parts, load, text_vocab
from cosy.inference.streaming import PromptWarp, mel_stream, stream_audio

AudioSource = Union[str, Path, tuple]  # a file, or (samples, sample_rate)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default"
SILENCE_PEAK = 1e-3  # -60 dBFS: nothing a speaker encoder could use
MIN_SOURCE_SECONDS = 0.1  # voice conversion: shorter holds no word, and is shorter than an STFT window


@dataclass
class Prompt:
    """What synthesis takes from a prompt recording (and its transcript)."""

    tokens: torch.Tensor     # (n,) speech tokens, cropped to the frames of `mel`
    mel: torch.Tensor        # (n_mels, frames) the flow decoder's mel
    embedding: torch.Tensor  # (spk_dim,) raw speaker embedding
    text: list[int]          # transcript ids; empty: the LM gets no prompt
    vocoder: Any = None      # the vocoder fitted to this voice (synthesis.vocoder_adapt_steps); None: the model's


@dataclass
class SpokenText:
    """A text read out: its speakable sentences, normalised, and their language. Made once
    by `CosyTTS.spoken`, so that checking a text and synthesising it share the work."""

    lang: str
    sentences: list[str]


def read_audio(source: AudioSource, what: str) -> tuple[np.ndarray, int, str]:
    """Mono float32 samples, their rate and a name for messages ("prompt voice.wav",
    "prompt array"), from a path or (array, rate)."""
    if isinstance(source, (str, Path)):
        samples, rate = load_audio(source)
        return samples, rate, f"{what} {source}"
    if not (isinstance(source, tuple) and len(source) == 2):
        raise CosyError(f"{what} must be an audio file path or a (samples, sample_rate) pair")
    samples, rate = np.asarray(source[0]), source[1]
    if np.issubdtype(samples.dtype, np.signedinteger):  # PCM as read by e.g. scipy: full scale is the type's range
        samples = samples.astype(np.float32) / -float(np.iinfo(samples.dtype).min)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise CosyError(f"{what}: samples must be float or signed integer PCM, got dtype {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise CosyError(f"{what}: sample rate must be a positive integer, got {rate!r}")
    if samples.ndim == 2:  # either (samples, channels) or (channels, samples): channels are fewer
        samples = samples.mean(axis=int(np.argmin(samples.shape)))
    if samples.ndim != 1 or samples.size == 0:
        raise CosyError(f"{what}: expected a non-empty mono or stereo array, got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise CosyError(f"{what}: the samples contain NaN or infinity")
    return np.ascontiguousarray(samples), int(rate), f"{what} array"


def encode_prompt_text(tokenizer, text: str, lang: str, vocab_size: int) -> list[int]:
    """Ids of a prompt transcript, or [] (with a warning) when the tokenizer cannot encode it."""
    from cosy.text.normalise import normalise
    from cosy.text.symbols import UNK

    try:
        spoken = normalise(text, lang)
        ids = tokenizer.encode(spoken) if any(ch.isalnum() for ch in spoken) else []
    except CosyError as err:
        ids, spoken = [], str(err)
    try:
        unknown = tokenizer.token_to_id(UNK)
    except CosyError:  # a vocabulary without an unknown token encodes everything
        unknown = None
    if not ids or unknown in ids or max(ids) >= vocab_size:
        warnings.warn(f"the text tokenizer cannot encode the prompt text {text[:60]!r}; synthesising without it "
                      "(speaker embedding and flow prompt only)", stacklevel=3)
        return []
    return ids


class CosyTTS:
    """A loaded system: `CosyTTS.from_pretrained(DIR)` then `synthesize`, `stream`, `convert`."""

    def __init__(self, parts: Parts, device: str = "cpu"):
        self.parts = parts
        self.device = device
        self.settings = parts.synthesis
        self.settings.check()

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, device: str = "cpu") -> "CosyTTS":
        """Load a model dir made by `cosy pack` (default: the installed default model)."""
        if directory is None:
            if not DEFAULT_MODEL_DIR.is_dir():
                raise CosyError(f"no default model is installed ({DEFAULT_MODEL_DIR} does not exist): "
                                "pass --model-dir DIR (a directory made by `cosy pack`)")
            directory = DEFAULT_MODEL_DIR
        if not Path(directory).is_dir():
            raise CosyError(f"--model-dir {directory}: not a directory")
        _check_device(device)
        return cls(load(directory, device), device)

    @property
    def sample_rate(self) -> int:
        return self.parts.vocoder.mel.sample_rate

    def set_flow_steps(self, steps: int) -> None:
        """Solve the flow decoder's ODE in `steps` steps instead of the model dir's `cfm.steps`.

        Its cost is proportional to the steps; recipes/mini/RESULTS.md measures what halving
        them costs the default model.
        """
        if steps < 1:
            raise CosyError(f"flow steps must be at least 1, got {steps}")
        flow = self.parts.flow
        flow.cfg = replace(flow.cfg, cfm=replace(flow.cfg.cfm, steps=steps))

    # ------------------------------------------------------------------ inputs

    def spoken(self, text: str | SpokenText) -> SpokenText:
        """`text` split into sentences and normalised; CosyError when nothing is speakable."""
        from cosy.text.normalise import detect_lang, normalise
        from cosy.text.split import split_sentences

        if isinstance(text, SpokenText):
            return text
        if not isinstance(text, str) or not text.strip():
            raise CosyError("text is empty: give some words to speak")
        lang = detect_lang(text) if self.settings.lang == "auto" else self.settings.lang
        spoken = [normalise(piece, lang) for piece in split_sentences(text, lang)]
        spoken = [s for s in spoken if any(ch.isalnum() for ch in s)]
        if not spoken:
            raise CosyError(f"text {text[:60]!r} has nothing speakable after normalisation (no letters or digits)")
        return SpokenText(lang, spoken)

    def sentences(self, text: str | SpokenText, prompt_text_len: int = 0) -> list[list[int]]:
        """Text ids of each speakable sentence of `text`, each short enough for the LM
        beside a prompt transcript of `prompt_text_len` ids; CosyError when there is none."""
        spoken = self.spoken(text)
        limit = self.parts.llm.cfg.max_text_len
        if prompt_text_len >= limit:
            raise CosyError(f"the prompt text has {prompt_text_len} tokens, which leaves no room for the text under "
                            f"the LM's maximum of {limit} (model.max_text_len): give a shorter prompt text")
        ids = [part for s in spoken.sentences for part in self._fitted(s, spoken.lang, limit - prompt_text_len)]
        if not ids:
            raise CosyError(f"text {' '.join(spoken.sentences)[:60]!r} has no ids in the text tokenizer")
        return ids

    def _fitted(self, spoken: str, lang: str, budget: int) -> list[list[int]]:
        """Ids of normalised `spoken`, cut at clauses or words into pieces of at most
        `budget` ids: sentences are split by characters, and numbers spelt out or Chinese
        text can still hold more tokens than the LM takes."""
        from cosy.text.split import split_sentences

        ids = self.parts.text_tokenizer.encode(spoken)
        if len(ids) <= budget:
            return [ids] if ids else []
        pieces = split_sentences(spoken, lang, max_chars=max(1, len(spoken) // 2), min_chars=1)
        if len(pieces) < 2:
            raise CosyError(f"{spoken[:60]!r} is {len(ids)} text tokens, more than the {budget} the LM takes, "
                            "and has no word boundary to cut it at")
        return [part for piece in pieces for part in self._fitted(piece, lang, budget)]

    def prompt(self, wav: AudioSource, text: str | None = None) -> Prompt:
        """Analyse a prompt recording; CosyError when it is unusable (too short, silent, unreadable)."""
        s = self.settings
        samples, rate, name = read_audio(wav, "prompt")
        seconds = len(samples) / rate
        if seconds < s.min_prompt_seconds:
            raise CosyError(f"{name} is {seconds:.2f} s long; it must be at least {s.min_prompt_seconds:g} s")
        if float(np.abs(samples).max()) < SILENCE_PEAK:
            raise CosyError(f"{name} is silent (peak below {SILENCE_PEAK:g}): record some speech")
        if seconds > s.max_prompt_seconds:
            warnings.warn(f"{name} is {seconds:.1f} s long; using its first {s.max_prompt_seconds:g} s",
                          stacklevel=2)
            samples = samples[:int(s.max_prompt_seconds * rate)]
        from cosy.flow.task import align
        from cosy.speaker.features import SAMPLE_RATE, fbank_features

        flow = self.parts.flow
        tokens = self.speech_tokens_of(samples, rate)
        embedding = self.parts.speaker(fbank_features(resample(samples, rate, SAMPLE_RATE),
                                                      self.parts.speaker.feat_dim))
        audio = torch.from_numpy(resample(samples, rate, flow.cfg.mel.sample_rate))[None]
        mel = mel_spectrogram(audio, flow.cfg.mel)[0]
        tokens, mel = align(tokens, mel, flow.cfg)
        ids = [] if text is None or not text.strip() else \
            encode_prompt_text(self.parts.text_tokenizer, text, self.settings.lang, text_vocab(self.parts.llm))
        vocoder = None
        if s.vocoder_adapt_steps:
            from cosy.vocoder.adapt import fit_to_recording

            vocoder = fit_to_recording(self.parts.vocoder, self.parts.vocoder_config, audio[0].numpy(),
                                       s.vocoder_adapt_steps, s.vocoder_adapt_lr)
        return Prompt(tokens.to(self.device), mel.to(self.device),
                      torch.as_tensor(embedding, dtype=torch.float32).to(self.device), ids, vocoder)

    def speech_tokens_of(self, samples: np.ndarray, rate: int) -> torch.Tensor:
        """Speech tokens (n,) long of mono audio; longer than the tokenizer's limit goes in windows."""
        from cosy.tokenizer.extract import Features, tokenize_stream

        backend = self.parts.tokenizer
        wave = torch.from_numpy(resample(samples, rate, backend.mel.sample_rate))[None]
        feats = whisper_log_mel(wave, backend.mel)[0]
        (_, tokens), = tokenize_stream(backend, [Features("audio", feats)], batch_size=4)
        return torch.from_numpy(tokens.astype(np.int64))

    # --------------------------------------------------------------- synthesis

    def synthesize(self, text: str | SpokenText, prompt_wav: AudioSource, prompt_text: str | None = None,
                   speed: float = 1.0, seed: int | None = None) -> tuple[np.ndarray, int]:
        """Speak `text` in the voice of `prompt_wav` -> (float32 waveform, sample rate)."""
        waves = self.synthesize_batch([text], prompt_wav, prompt_text, speed, seed)
        return waves[0], self.sample_rate

    def synthesize_batch(self, texts: Sequence[str | SpokenText], prompt_wav: AudioSource | Sequence[AudioSource],
                         prompt_text: str | None | Sequence[str | None] = None, speed: float = 1.0,
                         seed: int | None = None) -> list[np.ndarray]:
        """Several texts at once (the LM decodes up to `synthesis.batch_size` sentences
        together). `prompt_wav` / `prompt_text` are one for all texts or a list with one per
        text; a prompt may also be a `Prompt` from `self.prompt`, whose transcript it carries,
        and a text a `SpokenText` from `self.spoken`. Returns one float32 waveform per text
        at `self.sample_rate`."""
        texts = list(texts)
        wavs = list(prompt_wav) if isinstance(prompt_wav, list) else [prompt_wav] * len(texts)
        prompt_texts = list(prompt_text) if isinstance(prompt_text, list) else [prompt_text] * len(texts)
        if not (len(wavs) == len(prompt_texts) == len(texts)):
            raise CosyError(f"got {len(texts)} texts, {len(wavs)} prompt wavs and {len(prompt_texts)} prompt texts")
        self._check_speed(speed)
        cache: dict[tuple, Prompt] = {}

        def prompt_for(wav, ptext) -> Prompt:
            if isinstance(wav, Prompt):
                return wav
            key = (str(wav), ptext) if isinstance(wav, (str, Path)) else (id(wav), ptext)
            if key not in cache:
                cache[key] = self.prompt(wav, ptext)
            return cache[key]

        rows = []  # (text index, sentence ids, prompt)
        for index, (text, wav, ptext) in enumerate(zip(texts, wavs, prompt_texts)):
            spoken = self.spoken(text)
            self.sentences(spoken)  # a bad text fails before its prompt is analysed
            prompt = prompt_for(wav, ptext)
            rows += [(index, ids, prompt) for ids in self.sentences(spoken, len(prompt.text))]
        pieces: list[list[np.ndarray]] = [[] for _ in texts]
        with _seeded(seed, self.device):
            size = max(1, self.settings.batch_size)
            for start in range(0, len(rows), size):
                batch = rows[start:start + size]
                tokens = self.generate_tokens([r[1] for r in batch], [r[2] for r in batch], seed)
                waves = self.render([(t, r[2]) for t, r in zip(tokens, batch)], speed)
                for (index, _, _), wave in zip(batch, waves):
                    pieces[index].append(wave)
        return [self._join(p) for p in pieces]

    def generate_tokens(self, texts: list[list[int]], prompts: list[Prompt], seed: int | None = None) -> list[list[int]]:
        """Speech tokens of each text id list, decoded by the LM as one batch."""
        from cosy.llm.decode import generate

        return generate(self.parts.llm, **self._lm_inputs(texts, prompts), seed=seed)

    def _lm_inputs(self, texts: list[list[int]], prompts: list[Prompt]) -> dict:
        def padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            lengths = torch.tensor([len(r) for r in rows], device=self.device)
            if not int(lengths.max()):
                return torch.zeros(len(rows), 0, dtype=torch.long, device=self.device), lengths
            return pad_sequence(rows, batch_first=True).to(self.device), lengths

        text, text_len = padded([torch.tensor(t, dtype=torch.long) for t in texts])
        prompt_text, prompt_text_len = padded([torch.tensor(p.text, dtype=torch.long) for p in prompts])
        # without a transcript the prompt's speech tokens would have nothing to continue
        speech, speech_len = padded([p.tokens.cpu() if p.text else p.tokens.new_zeros(0).cpu() for p in prompts])
        return {"text": text, "text_len": text_len, "prompt_text": prompt_text, "prompt_text_len": prompt_text_len,
                "prompt_speech": speech, "prompt_speech_len": speech_len,
                "embedding": torch.stack([p.embedding for p in prompts])}

    @torch.inference_mode()
    def render(self, items: list[tuple[list[int], Prompt]], speed: float = 1.0) -> list[np.ndarray]:
        """(speech tokens, prompt) pairs -> waveforms: the flow decodes each one (and warps
        it toward its prompt's voice, `synthesis.prompt_warp_semitones`), the vocoder all of
        them as one padded batch, or one batch per prompt that has its own fitted vocoder."""
        flow, max_warp = self.parts.flow, self.settings.prompt_warp_semitones
        mels = []
        for tokens, prompt in items:
            if not tokens:
                mels.append(prompt.mel.new_zeros(flow.cfg.n_mels, 0))
                continue
            target = torch.tensor([tokens], dtype=torch.long, device=self.device)
            mel = flow.inference(target, prompt.tokens[None], prompt.mel[None], prompt.embedding[None], speed)
            if max_warp and mel.shape[2]:
                factor = matching_warp(mel[0], prompt.mel, flow.cfg.mel, max_warp)
                mel = warp_mel(mel, mel.new_tensor([factor]), flow.cfg.mel)
            mels.append(mel[0])
        vocoders = [self._vocoder_of(prompt) for _, prompt in items]
        waves: dict[int, np.ndarray] = {}
        for vocoder in {id(v): v for v in vocoders}.values():
            picked = [i for i, v in enumerate(vocoders) if v is vocoder]
            waves.update(zip(picked, _vocode(vocoder, [mels[i] for i in picked])))
        return [waves[i] for i in range(len(items))]

    def _vocoder_of(self, prompt: Prompt):
        return self.parts.vocoder if prompt.vocoder is None else prompt.vocoder

    def _join(self, pieces: list[np.ndarray]) -> np.ndarray:
        pause = np.zeros(int(self.settings.pause_seconds * self.sample_rate), dtype=np.float32)
        out = [pieces[0]]
        for piece in pieces[1:]:
            out += [pause, piece]
        return np.concatenate(out).astype(np.float32)

    def stream(self, text: str | SpokenText, prompt_wav: AudioSource, prompt_text: str | None = None,
               speed: float = 1.0, seed: int | None = None) -> Iterator[np.ndarray]:
        """Float32 audio chunks of `text` as they are made: each LM token goes straight on
        to chunked flow decoding and the streaming vocoder, so the first chunk comes long
        before the LM finishes. Sentences follow one another with a short pause. Bad input
        raises here, before the first chunk is asked for. The prompt may be a `Prompt`
        from `self.prompt`, as in `synthesize_batch`."""
        self._check_speed(speed)
        spoken = self.spoken(text)
        self.sentences(spoken)  # a bad text fails before the prompt is analysed
        prompt = prompt_wav if isinstance(prompt_wav, Prompt) else self.prompt(prompt_wav, prompt_text)
        return self._stream(self.sentences(spoken, len(prompt.text)), prompt, speed, seed)

    def _stream(self, sentences: list[list[int]], prompt: Prompt, speed: float,
                seed: int | None) -> Iterator[np.ndarray]:
        pause = np.zeros(int(self.settings.pause_seconds * self.sample_rate), dtype=np.float32)
        with _seeded(seed, self.device):
            for i, ids in enumerate(sentences):
                if i:
                    yield pause
                yield from self._stream_sentence(ids, prompt, speed, seed)

    def _stream_sentence(self, ids: list[int], prompt: Prompt, speed: float, seed: int | None) -> Iterator[np.ndarray]:
        from cosy.llm.decode import stream

        llm, s = self.parts.llm, self.settings
        tokens = (int(step[0]) for step in stream(llm, **self._lm_inputs([ids], [prompt]), seed=seed)
                  if int(step[0]) >= 0)
        decoder = mel_stream(self.parts.flow, prompt.tokens[None], prompt.mel[None], prompt.embedding[None], speed,
                             math.floor(len(ids) * llm.cfg.max_token_text_ratio) + 1, s.stream_chunk_tokens,
                             s.stream_holdback_tokens, s.stream_chunk_growth)
        if s.prompt_warp_semitones:
            decoder = PromptWarp(decoder, prompt.mel[None], self.parts.flow.cfg.mel, s.prompt_warp_semitones)
        yield from stream_audio(tokens, decoder, self._vocoder_of(prompt))

    @torch.inference_mode()
    def convert(self, source_wav: AudioSource, prompt_wav: AudioSource, speed: float = 1.0,
                seed: int | None = None) -> tuple[np.ndarray, int]:
        """Voice conversion: the words of `source_wav` in the voice of `prompt_wav`."""
        self._check_speed(speed)
        samples, rate, name = read_audio(source_wav, "source")
        if len(samples) < MIN_SOURCE_SECONDS * rate:
            raise CosyError(f"{name} is {len(samples) / rate:.3f} s long; it must be at least {MIN_SOURCE_SECONDS:g} s")
        if float(np.abs(samples).max()) < SILENCE_PEAK:
            raise CosyError(f"{name} is silent (peak below {SILENCE_PEAK:g})")
        prompt = self.prompt(prompt_wav)
        tokens = self.speech_tokens_of(samples, rate)
        if tokens.numel() == 0:
            raise CosyError(f"{name} is too short to give any speech tokens")
        if int(tokens.max()) >= self.parts.flow.cfg.vocab_size:
            raise CosyError(f"the speech tokenizer gave token {int(tokens.max())}, outside the flow decoder's "
                            f"vocabulary of {self.parts.flow.cfg.vocab_size} (flow/config.yaml model.vocab_size)")
        with _seeded(seed, self.device):
            wave, = self.render([(tokens.tolist(), prompt)], speed)
        return wave, self.sample_rate

    def _check_speed(self, speed: float) -> None:
        if not (isinstance(speed, (int, float)) and 0.25 <= speed <= 4.0):
            raise CosyError(f"speed must be between 0.25 and 4, got {speed!r}")
        if speed != 1.0 and self.parts.flow.cfg.causal:
            raise CosyError("speed must be 1.0 for a causal flow model (fixed frames per token)")


def _vocode(vocoder, mels: list[torch.Tensor]) -> list[np.ndarray]:
    """Mels `(n_mels, frames)` -> float32 waveforms, vocoded as one padded batch."""
    lengths = torch.tensor([m.shape[1] for m in mels], device=mels[0].device)
    if not int(lengths.max()):
        return [np.zeros(0, dtype=np.float32) for _ in mels]
    batch = pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
    waves, _ = vocoder(batch, lengths)
    return [waves[i, :int(n) * vocoder.hop].float().cpu().numpy() for i, n in enumerate(lengths)]


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise CosyError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1)") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise CosyError(f"device {device!r}: this torch sees no CUDA device")


@contextlib.contextmanager
def _seeded(seed: int | None, device: str):
    """Seed torch's generators (flow noise, vocoder phases) and restore them afterwards."""
    if seed is None:
        yield
        return
    if not 0 <= seed < 2**63:
        raise CosyError(f"seed must be between 0 and 2**63 - 1, got {seed}")
    target = torch.device(device)
    # manual_seed seeds every CUDA device too: fork the one the models run on
    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
