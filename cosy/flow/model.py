"""Conditional flow-matching decoder: speech tokens + speaker + prompt mel -> mel.

tokens -> embedding -> [look-ahead] -> conformer encoder -> projection to n_mels
-> length regulator -> mu; the estimator turns noise into mel along the OT path,
conditioned on [mu, speaker, prompt mel] (CosyVoice v1 design; `causal: true` gives the
chunked v2-style variant that `FlowStream` decodes chunk by chunk).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cosy.audio import FrequencyWarpConfig, MelConfig, random_warp
from cosy.errors import CosyError
from cosy.flow.cfm import CFMConfig, cfm_loss, euler, guided
from cosy.flow.estimator import Cache, Conv, Estimator, EstimatorConfig
from cosy.flow.regulator import LengthRegulator
from cosy.modules.masks import lengths_to_mask
from cosy.modules.transformer import Encoder, EncoderConfig


def _v1_encoder() -> EncoderConfig:
    return EncoderConfig(input_size=512, d_model=512, n_heads=8, ffn_dim=2048, n_layers=6,
                         layer="conformer", pos_enc="rel_pos", input_layer="linear")


@dataclass
class FlowConfig:
    """The `model:` section of a flow experiment; defaults are the published v1 sizes.

    `encoder.input_size` is the token embedding width. With `causal` the encoder
    attends in chunks of `chunk_tokens` tokens, each token also sees `lookahead` future
    tokens, every token becomes exactly sample_rate / hop / token_rate mel frames
    (an integer), and the estimator attends in chunks of that many frames per token with
    `left_chunks` chunks of left context (all when negative).
    """

    vocab_size: int = 4096
    token_rate: float = 50.0
    mel: MelConfig = field(default_factory=MelConfig)
    spk_dim: int = 192
    encoder: EncoderConfig = field(default_factory=_v1_encoder)
    regulator_convs: int = 4
    edge_tokens: int = 20  # targets over 2x this many tokens get their ends stretched alone
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)
    # Tokens of an ASR tokenizer trained briefly still carry much of the voice, so a decoder
    # can learn the training voices from the tokens alone and render an unseen speaker in
    # the nearest one. Warped items (target and prompt alike) always get the longest prompt
    # (`cfm.prompt_max`): the same tokens then stand for voices that only the prompt shows.
    warp: FrequencyWarpConfig = field(default_factory=FrequencyWarpConfig)
    causal: bool = False
    chunk_tokens: int = 25
    lookahead: int = 3
    left_chunks: int = 2  # bounds streaming memory and per-chunk cost; -1 = unlimited

    @property
    def n_mels(self) -> int:
        return self.mel.n_mels

    @property
    def frames_per_second(self) -> float:
        return self.mel.sample_rate / self.mel.hop_length

    def frames_for(self, tokens: int, speed: float = 1.0) -> int:
        """Mel frames of `tokens` tokens (the reference truncates)."""
        return int(tokens / self.token_rate * self.frames_per_second / speed)

    @property
    def ratio(self) -> int:
        """Mel frames per token of a causal model."""
        ratio = self.frames_per_second / self.token_rate
        if ratio != int(ratio):
            raise CosyError(f"model.causal needs an integer number of mel frames per token, got "
                            f"{ratio:g} (model.mel.sample_rate / model.mel.hop_length / model.token_rate)")
        return int(ratio)


class LookAhead(nn.Module):
    """Gives each token a view of the next `n` tokens before the chunk-causal encoder:
    x + causal_conv(leaky_relu(conv_{n+1}([x, future])))."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.conv1 = nn.Conv1d(dim, dim, n + 1)
        self.conv2 = Conv(dim, dim, 3, causal=True)

    def forward(self, x: torch.Tensor, future: torch.Tensor | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        """x (batch, tokens, dim); future (batch, <= n, dim) the tokens after x, zeros
        standing in for missing ones -> (batch, tokens, dim)."""
        h = x.transpose(1, 2)
        ahead = h.new_zeros(h.shape[0], h.shape[1], self.n)
        if future is not None:
            ahead[:, :, :future.shape[1]] = future.transpose(1, 2)
        h = F.leaky_relu(self.conv1(torch.cat([h, ahead], dim=2)), 0.01)
        return x + self.conv2(h, cache).transpose(1, 2)


class FlowModel(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        cfg.warp.check("model.warp")
        cfm = cfg.cfm
        if min(cfm.cfg_dropout, cfm.voice_dropout) < 0 or cfm.cfg_dropout + cfm.voice_dropout > 1:
            raise CosyError(f"model.cfm.cfg_dropout and model.cfm.voice_dropout must be at least 0 and sum "
                            f"to at most 1, got {cfm.cfg_dropout} and {cfm.voice_dropout}")
        if enc.causal or enc.chunk_size:
            raise CosyError("set model.causal and model.chunk_tokens instead of "
                            "model.encoder.causal / model.encoder.chunk_size")
        ratio = cfg.ratio if cfg.causal else 1
        if cfg.causal:
            enc = dataclasses.replace(enc, chunk_size=cfg.chunk_tokens)
            levels = len(cfg.estimator.channels)
            if (cfg.chunk_tokens * ratio) % 2 ** (levels - 1):
                raise CosyError(f"model.chunk_tokens * {ratio} frames must be divisible by "
                                f"{2 ** (levels - 1)} for a {levels}-level estimator")
        n_mels = cfg.n_mels
        self.embedding = nn.Embedding(cfg.vocab_size, enc.input_size)
        self.lookahead = LookAhead(enc.input_size, cfg.lookahead) if cfg.causal and cfg.lookahead else None
        self.encoder = Encoder(enc)
        self.encoder_proj = nn.Linear(enc.d_model, n_mels)
        self.spk_proj = nn.Linear(cfg.spk_dim, n_mels)
        self.regulator = LengthRegulator(n_mels, cfg.regulator_convs, cfg.causal, ratio)
        self.estimator = Estimator(cfg.estimator, n_mels, cfg.causal, cfg.chunk_tokens * ratio,
                                   cfg.left_chunks)

    # ----------------------------------------------------------------- building blocks
    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """(batch, spk_dim) raw speaker embedding -> (batch, n_mels)."""
        return self.spk_proj(F.normalize(embedding, dim=1))

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (batch, n) int, lengths (batch,) -> (batch, n, n_mels)."""
        valid = lengths_to_mask(lengths, tokens.shape[1]).unsqueeze(-1)
        x = self.embedding(tokens.clamp(min=0).long()) * valid
        if self.lookahead is not None:
            x = self.lookahead(x)
        h, _ = self.encoder(x, lengths)
        return self.encoder_proj(h)

    def condition(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_frames: int,
                  speed: float = 1.0) -> torch.Tensor:
        """Inference conditioning mu (1, n_mels, prompt_frames + target frames)."""
        cfg = self.cfg
        n1 = prompt_tokens.shape[1]
        all_tokens = torch.cat([prompt_tokens, tokens], dim=1)
        h = self.encode(all_tokens, torch.tensor([all_tokens.shape[1]], device=tokens.device))
        if cfg.causal:
            return self.regulator.expand(h)
        edge = (cfg.edge_tokens, cfg.frames_for(cfg.edge_tokens, speed)) if cfg.edge_tokens else None
        return self.regulator.inference(h[:, :n1], h[:, n1:], prompt_frames,
                                        cfg.frames_for(tokens.shape[1], speed), edge)

    # ----------------------------------------------------------------------- training
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: speech_token (B, N), speech_token_len (B,), speech_feat (B, n_mels, T),
        speech_feat_len (B,), embedding (B, spk_dim) -> {"loss"}."""
        feat, feat_len = batch["speech_feat"], batch["speech_feat_len"]
        mu = self.regulator(self.encode(batch["speech_token"], batch["speech_token_len"]), feat_len)
        mask = lengths_to_mask(feat_len, feat.shape[2]).unsqueeze(1).to(feat.dtype)
        feat, warped = self._warp(feat)
        cond = self._random_prompt(feat, feat_len, warped)
        loss = cfm_loss(self.estimator, feat, mask, mu, self.speaker(batch["embedding"]), cond, self.cfg.cfm)
        return {"loss": loss}

    def _warp(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`cfg.warp` while training -> (mel, which items were warped (batch,))."""
        if not self.training:
            return feat, torch.zeros(feat.shape[0], dtype=torch.bool, device=feat.device)
        return random_warp(feat, self.cfg.warp, self.cfg.mel)

    def _random_prompt(self, feat: torch.Tensor, feat_len: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """A random prefix of up to `prompt_max` of each item's frames, for
        `prompt_prob` of the items, and the longest one for the `forced` items, as the
        prompt condition; zeros elsewhere."""
        b, _, t = feat.shape
        longest = (feat_len.float() * self.cfg.cfm.prompt_max).long()
        size = (torch.rand(b, device=feat.device) * (longest + 1).float()).long()
        size = size * (torch.rand(b, device=feat.device) < self.cfg.cfm.prompt_prob)
        size = torch.where(forced, longest, size)
        keep = lengths_to_mask(size, t)
        return feat * keep.unsqueeze(1)

    # ---------------------------------------------------------------------- inference
    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, speed: float = 1.0, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Zero-shot decoding of one utterance.

        tokens (1, n2), prompt_tokens (1, n1) (may be empty), prompt_feat (1, n_mels, f1),
        embedding (1, spk_dim). `speed` > 1 shortens the output. `noise` (1, n_mels,
        f1 + f2) replaces the draw from `generator`. Returns the mel (1, n_mels, f2)
        without the prompt part.
        """
        cfg = self.cfg
        self._check_inputs(tokens, prompt_tokens, prompt_feat, embedding)
        if cfg.frames_for(tokens.shape[1], speed) == 0:
            return prompt_feat.new_zeros(1, cfg.n_mels, 0)
        if cfg.causal:
            if speed != 1.0:
                raise CosyError("speed must be 1.0 for a causal flow model (fixed frames per token)")
            prompt_feat = self._causal_prompt(prompt_tokens, prompt_feat)
        f1 = prompt_feat.shape[2]
        mu = self.condition(tokens, prompt_tokens, f1, speed)
        cond = torch.zeros_like(mu)
        cond[:, :, :f1] = prompt_feat
        if noise is None:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device)
        elif noise.shape != mu.shape:
            raise CosyError(f"noise must have shape {tuple(mu.shape)}, got {tuple(noise.shape)}")
        mask = torch.ones_like(mu[:, :1])
        field = guided(self.estimator, cfg.cfm)
        mel = euler(field, noise, mask, mu, self.speaker(embedding), cond, cfg.cfm)
        return mel[:, :, f1:]

    def _check_inputs(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                      embedding: torch.Tensor) -> None:
        cfg = self.cfg
        for name, ids in (("tokens", tokens), ("prompt_tokens", prompt_tokens)):
            if ids.numel() and int(ids.max()) >= cfg.vocab_size:
                raise CosyError(f"{name} hold id {int(ids.max())}, outside model.vocab_size = {cfg.vocab_size}")
        if prompt_feat.dim() != 3 or prompt_feat.shape[1] != cfg.n_mels:
            raise CosyError(f"prompt_feat must be (1, {cfg.n_mels}, frames) (model.mel.n_mels), "
                            f"got {tuple(prompt_feat.shape)}")
        if embedding.shape[-1] != cfg.spk_dim:
            raise CosyError(f"speaker embedding has {embedding.shape[-1]} values, model.spk_dim is {cfg.spk_dim}")

    def _causal_prompt(self, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor) -> torch.Tensor:
        need = prompt_tokens.shape[1] * self.cfg.ratio
        if prompt_feat.shape[2] < need:
            raise CosyError(f"prompt mel has {prompt_feat.shape[2]} frames, fewer than the "
                            f"{need} its {prompt_tokens.shape[1]} prompt tokens need")
        return prompt_feat[:, :, :need]

    def stream(self, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor, embedding: torch.Tensor,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               max_tokens: int = 1000) -> "FlowStream":
        """Start chunked decoding (causal models only); see FlowStream."""
        return FlowStream(self, prompt_tokens, prompt_feat, embedding, noise, generator, max_tokens)


class FlowStream:
    """Chunk-by-chunk decoding with a causal FlowModel.

    Tokens arrive with `push`; every complete chunk of `chunk_tokens` tokens whose
    `lookahead` successors are known is decoded at once and its mel returned (prompt
    frames excluded; chunks made only of prompt tokens are decoded when the stream
    starts); `finish` decodes the rest. Each chunk runs the encoder with its
    key/value cache, the regulator and look-ahead convs with their left context, and
    the 10 solver steps with one estimator cache per step (keys/values of the visible
    earlier chunks, conv left context), so a chunk costs the same however many came
    before it, and the output equals `FlowModel.inference` on all tokens with the
    same noise. The estimator caches hold, per solver step and transformer block, the
    keys and values of `left_chunks` chunks (a few hundred MB at v2 sizes).
    """

    def __init__(self, model: FlowModel, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None,
                 max_tokens: int):
        cfg = model.cfg
        if not cfg.causal:
            raise CosyError("streaming needs a causal flow model (model.causal: true)")
        self.model, self.cfg = model, cfg
        model._check_inputs(prompt_tokens, prompt_tokens, prompt_feat, embedding)
        self.prompt_feat = model._causal_prompt(prompt_tokens, prompt_feat)
        self.tokens = prompt_tokens[0].long()
        self.spk = model.speaker(embedding)
        self.noise, self.generator = noise, generator
        device = embedding.device
        self.max_tokens = max_tokens
        self.encoder_cache = model.encoder.new_cache(1, max_tokens, device)
        self.conv_cache: Cache = {}
        self.step_caches: list[Cache] = [{} for _ in range(cfg.cfm.steps)]
        self.done = 0  # tokens decoded so far, prompt included
        with torch.inference_mode():  # prompt chunks need no new tokens: decode them now
            self._advance()

    @torch.inference_mode()
    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (1, n) -> mel (1, n_mels, frames) of every chunk now complete."""
        if tokens.numel() and int(tokens.max()) >= self.cfg.vocab_size:
            raise CosyError(f"tokens hold id {int(tokens.max())}, outside model.vocab_size = {self.cfg.vocab_size}")
        self.tokens = torch.cat([self.tokens, tokens[0].long().to(self.tokens.device)])
        if len(self.tokens) > self.max_tokens:
            raise CosyError(f"stream holds {len(self.tokens)} tokens (prompt included), more than its "
                            f"max_tokens = {self.max_tokens}")
        return self._advance()

    def _advance(self) -> torch.Tensor:
        out = []
        while len(self.tokens) - self.done >= self.cfg.chunk_tokens + self.cfg.lookahead:
            out.append(self._chunk(self.cfg.chunk_tokens))
        return self._join(out)

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """Decode the remaining tokens (no more will come) -> mel (1, n_mels, frames)."""
        out = []
        while self.done < len(self.tokens):
            out.append(self._chunk(min(self.cfg.chunk_tokens, len(self.tokens) - self.done)))
        return self._join(out)

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if not parts:
            return self.spk.new_zeros(1, self.cfg.n_mels, 0)
        return torch.cat(parts, dim=2)

    def _chunk(self, n: int) -> torch.Tensor:
        model, cfg = self.model, self.cfg
        ids = self.tokens[self.done: self.done + n + cfg.lookahead].clamp(min=0)
        x = model.embedding(ids).unsqueeze(0)
        if model.lookahead is not None:
            x = model.lookahead(x[:, :n], x[:, n:], self.conv_cache)
        h = model.encoder_proj(model.encoder.forward_step(x, self.encoder_cache))
        mu = model.regulator.expand(h, self.conv_cache)
        start, stop = self.done * cfg.ratio, (self.done + n) * cfg.ratio
        cond = torch.zeros_like(mu)
        prompt = self.prompt_feat[:, :, start:stop]
        cond[:, :, :prompt.shape[2]] = prompt
        if self.noise is not None:
            z = self.noise[:, :, start:stop]
        else:
            z = torch.randn(mu.shape, generator=self.generator, device=mu.device)
        field = guided(model.estimator, cfg.cfm)
        mel = euler(field, z, torch.ones_like(mu[:, :1]), mu, self.spk, cond, cfg.cfm, self.step_caches)
        self.done += n
        return mel[:, :, max(0, self.prompt_feat.shape[2] - start):]
