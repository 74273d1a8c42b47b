"""Text-to-speech-token language model.

Sequence (one row per utterance):

    [sos, speaker, text_1 .. text_N, task, speech_1 .. speech_M]
     targets:  ignored for every position before `task`, then speech_1 .. speech_M, eos

Two backbones, chosen by `LLMConfig.backbone`:
* "transformer" (v1 design): text embedding -> causal `Encoder` -> projection; the LM is
  a causal `Encoder`; the speaker embedding is L2-normalised and projected.
* "hf" (v2 design): a Hugging Face decoder stack (e.g. Qwen2) built from a local
  config/checkpoint directory; its own token embedding embeds the text, there is no text
  encoder and no speaker slot.
Either way the model owns the special (sos, task) and speech-token embeddings and ONE
linear head over speech_vocab + 1 outputs (the last one is eos).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from cosy.errors import CosyError
from cosy.llm.sampling import SamplingConfig
from cosy.modules import Encoder, EncoderConfig, lengths_to_mask

IGNORE = -1
PAD_VALUE = -1.0  # fills padded LM input rows, as the reference does (they are masked anyway)


def _v1_text_encoder() -> EncoderConfig:
    return EncoderConfig(input_size=512, d_model=1024, n_heads=16, ffn_dim=4096, n_layers=6,
                         input_layer="linear", layer="conformer", causal=True)


def _v1_lm() -> EncoderConfig:
    # max_len leaves room for max_text_len text tokens and 20 speech tokens per text token
    return EncoderConfig(input_size=1024, d_model=1024, n_heads=16, ffn_dim=4096, n_layers=14,
                         input_layer="linear_legacy", layer="transformer", causal=True, max_len=6000)


@dataclass
class LLMConfig:
    """The `model:` section of an `llm` experiment (defaults: the published v1 sizes).

    backbone: "transformer" (text_encoder + lm below) or "hf" (`hf_dir`).
    hf_dir: directory with a Hugging Face `config.json` and optionally weights; without
        weights the backbone starts from random initialisation.
    text_embed_dim must equal text_encoder.input_size; lm.input_size is the width of every
    LM input row (speech, special and speaker embeddings, projected text).
    max_text_len: longest prompt text + text (in tokens) accepted at inference.
    min/max_token_text_ratio: decoded length bounds as multiples of the text length
        (prompt text excluded); eos is masked before the minimum.
    tokenizer: path of the text tokenizer (`cosy.text.bpe`) used by the training task.
    """

    backbone: Literal["transformer", "hf"] = "transformer"
    text_vocab: int = 51866
    text_embed_dim: int = 512
    text_encoder: EncoderConfig = field(default_factory=_v1_text_encoder)
    lm: EncoderConfig = field(default_factory=_v1_lm)
    hf_dir: str = ""
    speech_vocab: int = 4096
    spk_embed_dim: int = 192
    label_smoothing: float = 0.0
    length_normalized_loss: bool = True
    max_text_len: int = 256
    min_token_text_ratio: float = 2.0
    max_token_text_ratio: float = 20.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tokenizer: str = ""


class HFCache:
    """Decoding state of an `HFBackbone`: a preallocated transformers `StaticCache`.

    Rows share storage slots (the static cache appends at one index for all rows), so
    a row that received fewer real frames than the others has masked slots ("holes");
    `valid` is the attention mask over slots and `fill` the next real position per row.
    """

    def __init__(self, config, batch: int, max_len: int, device):
        from transformers import StaticCache

        self.kv = StaticCache(config=config, max_cache_len=max_len)
        self.valid = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.fill = torch.zeros(batch, dtype=torch.long, device=device)
        self.used = 0


class HFBackbone(nn.Module):
    """A Hugging Face base model (no LM head) driven by input embeddings.

    Offers the same calls as `Encoder`: forward(x, lengths), new_cache, forward_step.
    """

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        directory = Path(path)
        if not path or not (directory / "config.json").is_file():
            raise CosyError(f"config key 'model.hf_dir': no Hugging Face config.json in '{path}'")
        config = AutoConfig.from_pretrained(directory)
        has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
        if has_weights:
            self.model = AutoModel.from_pretrained(directory, dtype=torch.float32)
        else:
            self.model = AutoModel.from_config(config)
        self.width = config.hidden_size
        self.max_positions = config.max_position_embeddings

    def embed_text(self, tokens: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(tokens)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x: (batch, time, width) right-padded -> (batch, time, width), lengths."""
        positions = torch.arange(x.size(1), device=x.device)[None].expand(x.size(0), -1)
        mask = lengths_to_mask(lengths, x.size(1)).long()
        out = self.model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state, lengths

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> HFCache:
        return HFCache(self.model.config, batch, max_len, device)

    def forward_step(self, x: Tensor, cache: HFCache, lengths: Tensor | None = None) -> Tensor:
        """Append x: (batch, n, width), of which `lengths` frames per row are real."""
        n = x.size(1)
        if lengths is None:
            lengths = torch.full_like(cache.fill, n)
        slots = torch.arange(cache.used, cache.used + n, device=x.device)
        if slots[-1] >= cache.valid.size(1):
            raise ValueError(f"KV cache of {cache.valid.size(1)} positions is full")
        cache.valid[:, slots] = lengths_to_mask(lengths, n).long()
        positions = cache.fill[:, None] + torch.arange(n, device=x.device)
        out = self.model(inputs_embeds=x, attention_mask=cache.valid[:, : cache.used + n], position_ids=positions,
                         cache=cache.kv, use_cache=True, cache_position=slots)
        cache.used += n
        cache.fill = cache.fill + lengths
        return out.last_hidden_state


class LLM(nn.Module):
    """Speech-token LM; `forward(batch)` returns {"loss", "acc"} (see module docstring)."""

    SOS, TASK = 0, 1  # rows of `special_embedding`

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.eos = cfg.speech_vocab
        if cfg.backbone == "transformer":
            if cfg.text_encoder.input_size != cfg.text_embed_dim:
                raise CosyError(f"config key 'model.text_encoder.input_size' ({cfg.text_encoder.input_size}) must "
                                f"equal 'model.text_embed_dim' ({cfg.text_embed_dim})")
            if not (cfg.lm.causal or cfg.lm.chunk_size == 1):
                raise CosyError("config key 'model.lm.causal' must be true: the LM predicts the next token")
            width, out_dim = cfg.lm.input_size, cfg.lm.d_model
            self.text_embedding = nn.Embedding(cfg.text_vocab, cfg.text_embed_dim)
            self.text_encoder = Encoder(cfg.text_encoder)
            self.text_proj = nn.Linear(cfg.text_encoder.d_model, width)
            self.spk_proj = nn.Linear(cfg.spk_embed_dim, width)
            self.lm = Encoder(cfg.lm)
            self.max_positions = cfg.lm.max_len
        else:
            self.lm = HFBackbone(cfg.hf_dir)
            width = out_dim = self.lm.width
            self.max_positions = self.lm.max_positions
        self.special_embedding = nn.Embedding(2, width)
        self.speech_embedding = nn.Embedding(cfg.speech_vocab, width)
        self.head = nn.Linear(out_dim, cfg.speech_vocab + 1)

    @property
    def uses_speaker(self) -> bool:
        return self.cfg.backbone == "transformer"

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(batch, time) text ids -> (batch, time, width) LM input rows."""
        if self.cfg.backbone == "hf":
            return self.lm.embed_text(tokens)
        encoded, _ = self.text_encoder(self.text_embedding(tokens), lengths)
        return self.text_proj(encoded)

    def speaker(self, embedding: Tensor | None) -> Tensor | None:
        """(batch, spk_embed_dim) -> (batch, width), or None when unused."""
        if embedding is None or not self.uses_speaker:
            return None
        return self.spk_proj(F.normalize(embedding.float(), dim=1))

    def assemble(self, text: Tensor, text_len: Tensor, speaker: Tensor | None, speech: Tensor,
                 speech_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Build the right-padded LM input.

        text: (batch, T, width); speaker: (batch, width) or None; speech: (batch, S, width).
        Returns x: (batch, L, width), lengths (batch,), prefix (batch,) = positions up to
        and including `task` (the first speech target is predicted at prefix - 1).
        """
        sos = self.special_embedding.weight[self.SOS][None]
        task = self.special_embedding.weight[self.TASK][None]
        rows = []
        for b in range(text.size(0)):
            parts = [sos] + ([speaker[b][None]] if speaker is not None else [])
            parts += [text[b, : text_len[b]], task, speech[b, : speech_len[b]]]
            rows.append(torch.cat(parts))
        lengths = torch.tensor([len(r) for r in rows], device=text.device)
        prefix = lengths - speech_len.to(text.device)
        return pad_sequence(rows, batch_first=True, padding_value=PAD_VALUE), lengths, prefix

    def hidden(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Full causal pass of the LM: (batch, L, width) -> (batch, L, out_dim)."""
        return self.lm(x, lengths)[0]

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Teacher-forced loss.

        batch: text_token (B, T) long, text_token_len (B,), speech_token (B, S) long,
        speech_token_len (B,), embedding (B, spk_embed_dim) (transformer backbone).
        """
        text_len, speech_len = batch["text_token_len"], batch["speech_token_len"]
        text = self.encode_text(batch["text_token"], text_len)
        speech = self.speech_embedding(batch["speech_token"])
        x, lengths, prefix = self.assemble(text, text_len, self.speaker(batch.get("embedding")), speech, speech_len)
        logits = self.head(self.hidden(x, lengths))
        targets = self.targets(batch["speech_token"], speech_len, prefix, x.size(1))
        return self.loss(logits, targets)

    def targets(self, speech: Tensor, speech_len: Tensor, prefix: Tensor, length: int) -> Tensor:
        """(batch, length) targets: IGNORE before the task position, speech tokens, eos."""
        targets = torch.full((speech.size(0), length), IGNORE, dtype=torch.long, device=speech.device)
        for b in range(speech.size(0)):
            start, n = int(prefix[b]) - 1, int(speech_len[b])
            targets[b, start: start + n] = speech[b, :n]
            targets[b, start + n] = self.eos
        return targets

    def loss(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        valid = targets != IGNORE
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                reduction="sum", label_smoothing=self.cfg.label_smoothing)
        denominator = valid.sum() if self.cfg.length_normalized_loss else torch.tensor(logits.size(0))
        hits = (logits.argmax(-1) == targets) & valid
        return {"loss": total / denominator.clamp(min=1), "acc": hits.sum() / valid.sum().clamp(min=1)}

    def prepare(self, text: Tensor, text_len: Tensor, prompt_text: Tensor | None = None,
                prompt_text_len: Tensor | None = None, prompt_speech: Tensor | None = None,
                prompt_speech_len: Tensor | None = None, embedding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inference input [sos, spk, prompt_text ++ text, task, prompt_speech] per row.

        All token tensors are right-padded (batch, time) with (batch,) lengths; the
        prompts are optional. Returns x: (batch, L, width) and lengths (batch,).
        """
        batch = text.size(0)
        zeros = torch.zeros(batch, dtype=torch.long, device=text.device)
        if prompt_text is None:
            prompt_text, prompt_text_len = text[:, :0], zeros
        if prompt_speech is None:
            prompt_speech, prompt_speech_len = text[:, :0], zeros
        self.check_inputs(text_len, prompt_text_len, prompt_speech, prompt_speech_len)
        joined = [torch.cat([prompt_text[b, : prompt_text_len[b]], text[b, : text_len[b]]]) for b in range(batch)]
        tokens = pad_sequence(joined, batch_first=True, padding_value=0)
        tokens_len = prompt_text_len + text_len
        speech = self.speech_embedding(prompt_speech.clamp(min=0))
        x, lengths, _ = self.assemble(self.encode_text(tokens, tokens_len), tokens_len, self.speaker(embedding),
                                      speech, prompt_speech_len)
        return x, lengths

    def check_inputs(self, text_len: Tensor, prompt_text_len: Tensor, prompt_speech: Tensor,
                     prompt_speech_len: Tensor) -> None:
        if (text_len <= 0).any():
            raise CosyError(f"empty text for batch item(s) {torch.nonzero(text_len <= 0).flatten().tolist()}")
        total = text_len + prompt_text_len
        if (total > self.cfg.max_text_len).any():
            raise CosyError(f"text of {int(total.max())} tokens (prompt text included) is longer than the model "
                            f"maximum of {self.cfg.max_text_len} (config key 'model.max_text_len')")
        valid = lengths_to_mask(prompt_speech_len, prompt_speech.size(1))
        used = prompt_speech[valid]
        if used.numel() and (used.min() < 0 or used.max() >= self.cfg.speech_vocab):
            raise CosyError(f"prompt speech token {int(used.max() if used.max() >= self.cfg.speech_vocab else used.min())}"
                            f" is outside the LM's speech vocabulary of {self.cfg.speech_vocab}: the speech "
                            "tokenizer and the LM do not match (config key 'model.speech_vocab')")
