"""The single-codebook quantisers of the S3 tokenizer, behind one interface.

* `vq`: a learned codebook with EMA updates, a commitment loss and re-initialisation of
  dead codes from recent encoder outputs (CosyVoice v1 style, 4096 codes).
* `fsq`: finite scalar quantisation: project down, bound each dimension with tanh, round
  to a few levels (CosyVoice 2 style, 8 dims x 3 levels = 6561 codes, no codebook to learn).
* `none`: the identity, for the unquantised baseline of the same model.

Every quantiser maps `(batch, time, dim)` vectors to `(batch, time, dim)` vectors and, except
`none`, to integer codes `(batch, time)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import distributed as dist

from cosy.errors import CosyError


@dataclass
class QuantizerConfig:
    """kind: `vq`, `fsq` or `none`.

    vq: codebook_size codes of codebook_dim dims (None: the encoder's width; otherwise the
    encoder output is projected down to it and back up), EMA `decay`, commitment weight
    `beta`, `l2_normalize` codes and inputs (cosine-similarity lookup), and a code unused for
    `dead_after` training updates is replaced by a random vector of the current batch.
    fsq: `levels` per dimension; the number of codes is their product. `whiten`: decorrelate
    the projected dimensions (batch whitening) instead of only standardising each one.
    """

    kind: Literal["vq", "fsq", "none"] = "fsq"
    codebook_size: int = 4096
    codebook_dim: int | None = None
    decay: float = 0.99
    beta: float = 0.25
    l2_normalize: bool = False
    dead_after: int = 50
    levels: list[int] = field(default_factory=lambda: [3] * 8)
    whiten: bool = False


class Quantizer(nn.Module):
    """Interface shared by all quantisers."""

    codebook_size: int

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """x: (batch, time, dim); mask: (batch, time) bool, True on real frames.

        Returns the quantised vectors (batch, time, dim) with straight-through gradients,
        the codes (batch, time) long (None for `none`) and a dict of auxiliary losses.
        """
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """(batch, time, dim) -> codes (batch, time) long."""
        raise NotImplementedError

    def decode(self, indices: Tensor) -> Tensor:
        """codes (batch, time) -> vectors (batch, time, dim)."""
        raise NotImplementedError


class NoQuantizer(Quantizer):
    codebook_size = 0

    def forward(self, x, mask=None):
        return x, None, {}

    def encode(self, x):
        raise CosyError("this tokenizer was trained with model.quantizer.kind 'none': it has no discrete tokens")

    def decode(self, indices):
        raise CosyError("this tokenizer was trained with model.quantizer.kind 'none': it has no discrete tokens")


class FSQ(Quantizer):
    """Finite scalar quantisation (Mentzer et al. 2023) with straight-through rounding.

    The projected values are standardised (zero mean, unit variance per dimension over the
    batch's real frames in training, running estimates of those in eval) before tanh.
    Without this the projection drifts into tanh's flat tails: an encoder trained from
    scratch varies little from frame to frame at first, its output's mean moves as it
    trains, and every frame then rounds to the same code, where the vanishing tanh
    gradient keeps it (one code of 6561 on the mini corpus, measured both without
    standardisation and with a one-off standardisation at the first batch).

    With `whiten`, the projection is decorrelated too (Cholesky whitening of the batch
    covariance; a running estimate of its whitening matrix in eval). Standardised digits
    can each be used uniformly and still be correlated, so that their combinations cluster
    in a small part of the codebook (22% of 6561 codes used on the mini corpus's dev set).
    """

    def __init__(self, dim: int, levels: list[int], whiten: bool = False):
        super().__init__()
        if not levels or min(levels) < 2:
            raise CosyError(f"config key 'model.quantizer.levels' needs values >= 2, got {levels}")
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        # index = sum_j digit_j * prod(levels[:j]): for 3 levels, digit_j = h_j + 1 and basis 3^j
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("basis", basis, persistent=False)
        self.codebook_size = math.prod(levels)
        self.down = nn.Linear(dim, len(levels))
        self.up = nn.Linear(len(levels), dim)
        # written out rather than nn.BatchNorm1d, whose ONNX export needs static shapes
        self.register_buffer("running_mean", torch.zeros(len(levels)))
        self.register_buffer("running_var", torch.ones(len(levels)))
        self.momentum = 0.1
        self.whiten = whiten
        if whiten:
            self.register_buffer("running_cov", torch.eye(len(levels)))
            self.register_buffer("whitening", torch.eye(len(levels)))

    def _project(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(batch, time, dim) -> standardised (batch, time, levels) in float32; padded frames
        (mask False) neither enter the statistics nor get more than zeros."""
        z = self.down(x).float()
        with torch.autocast(z.device.type, enabled=False):
            if self.training:
                flat = z.reshape(-1, z.shape[-1])
                if mask is not None:
                    flat = flat[mask.reshape(-1)]
                out = self._whiten_batch(z, flat) if self.whiten else self._standardise_batch(z, flat)
            elif self.whiten:
                out = (z - self.running_mean) @ self.whitening.T
            else:
                out = (z - self.running_mean) / torch.sqrt(self.running_var + 1e-5)
        return out if mask is None else out * mask.unsqueeze(-1)

    def _standardise_batch(self, z: Tensor, flat: Tensor) -> Tensor:
        """z standardised by the statistics of `flat` (its real frames, (n, d))."""
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(flat.var(0), self.momentum)
        return (z - mean) / torch.sqrt(var + 1e-5)

    def _whiten_batch(self, z: Tensor, flat: Tensor) -> Tensor:
        """z whitened by the covariance of `flat` (its real frames, (n, d))."""
        eye = torch.eye(z.shape[-1], device=z.device)
        mean = flat.mean(0)
        cov = (flat - mean).T @ (flat - mean) / max(len(flat), 1) + 1e-5 * eye
        # cov = L L^T, so L^-1 (z - mean) has identity covariance
        whitening = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), eye, upper=False)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_cov.lerp_(cov, self.momentum)
            self.whitening.copy_(torch.linalg.solve_triangular(torch.linalg.cholesky(self.running_cov), eye,
                                                               upper=False))
        return (z - mean) @ whitening.T

    def _round(self, z: Tensor) -> Tensor:
        """(..., d) -> integer-valued (..., d) in [-(L//2), (L-1)//2], straight-through."""
        levels = self.levels.to(z.dtype)
        # shrink slightly so tanh never reaches the half-integer where rounding flips
        half = (levels - 1) * (1 - 1e-3) / 2
        # even level counts are asymmetric around 0: shift by half a step (the FSQ paper's
        # tan shift; any shift that keeps all levels reachable would do)
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.tan(offset / half)
        bounded = torch.tanh(z + shift) * half - offset
        return bounded + (torch.round(bounded) - bounded).detach()

    def _digits_to_index(self, h: Tensor) -> Tensor:
        """Integer-valued codes (..., d) -> index (...,)."""
        digits = torch.round(h).long() + self.levels // 2
        return (digits * self.basis).sum(-1)

    def _index_to_digits(self, indices: Tensor) -> Tensor:
        """index (...,) -> integer codes (..., d) as a float tensor."""
        digits = (indices.long().unsqueeze(-1) // self.basis) % self.levels
        return (digits - self.levels // 2).to(self.up.weight.dtype)

    def _scale(self, h: Tensor) -> Tensor:
        """Integer codes -> roughly [-1, 1] before projecting up."""
        return h / (self.levels // 2).clamp(min=1).to(h.dtype)

    def forward(self, x, mask=None):
        # float32 even under autocast: bf16 cannot place tanh values near a rounding edge
        h = self._round(self._project(x, mask))
        return self.up(self._scale(h)), self._digits_to_index(h.detach()), {}

    def encode(self, x):
        return self._digits_to_index(self._round(self._project(x)))

    def decode(self, indices):
        return self.up(self._scale(self._index_to_digits(indices)))


class VQ(Quantizer):
    """Vector quantisation with an EMA-updated codebook (van den Oord et al. 2017, Razavi 2019).

    The codebook is a buffer, not a parameter: it moves by exponential moving averages of
    the vectors assigned to each code, so the optimiser only sees the commitment loss.
    """

    def __init__(self, dim: int, cfg: QuantizerConfig):
        super().__init__()
        code_dim = cfg.codebook_dim or dim
        self.codebook_size = cfg.codebook_size
        self.decay = cfg.decay
        self.beta = cfg.beta
        self.l2_normalize = cfg.l2_normalize
        self.dead_after = cfg.dead_after
        self.down = nn.Linear(dim, code_dim) if code_dim != dim else nn.Identity()
        self.up = nn.Linear(code_dim, dim) if code_dim != dim else nn.Identity()
        embed = self._norm(torch.randn(cfg.codebook_size, code_dim))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.ones(cfg.codebook_size))
        self.register_buffer("unused_steps", torch.zeros(cfg.codebook_size, dtype=torch.long))

    def _norm(self, v: Tensor) -> Tensor:
        return F.normalize(v, dim=-1) if self.l2_normalize else v

    def _nearest(self, z: Tensor) -> Tensor:
        """z: (n, code_dim) -> code index (n,)."""
        with torch.autocast(z.device.type, enabled=False):
            dist2 = z.pow(2).sum(-1, keepdim=True) - 2 * z @ self.embed.t() + self.embed.pow(2).sum(-1)
        return dist2.argmin(-1)

    def forward(self, x, mask=None):
        # distances and EMA statistics in float32, also under autocast
        z = self._norm(self.down(x).float())
        flat = z.reshape(-1, z.shape[-1])
        indices = self._nearest(flat.detach())
        valid = torch.ones(flat.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask.reshape(-1)
        if self.training:
            self._update(flat.detach()[valid], indices[valid])
        q = self.embed[indices].view_as(z)
        weight = valid.view(z.shape[:-1]).unsqueeze(-1).to(z.dtype)
        commit = ((z - q.detach()).pow(2) * weight).sum() / (weight.sum() * z.shape[-1]).clamp(min=1)
        q = z + (q - z).detach()
        return self.up(q), indices.view(z.shape[:-1]), {"commit": self.beta * commit}

    @torch.no_grad()
    def _update(self, z: Tensor, indices: Tensor) -> None:
        """EMA step on (n, code_dim) vectors with their codes, then dead-code re-initialisation."""
        onehot = F.one_hot(indices, self.codebook_size).to(z.dtype)
        counts = onehot.sum(0)
        with torch.autocast(z.device.type, enabled=False):
            sums = onehot.t() @ z
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (total + self.codebook_size * 1e-5) * total
        self.embed.copy_(self._norm(self.embed_sum / smoothed.unsqueeze(-1)))
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        self._revive(z)

    @torch.no_grad()
    def _revive(self, z: Tensor) -> None:
        dead = (self.unused_steps >= self.dead_after).nonzero().squeeze(-1)
        if dead.numel() == 0 or z.shape[0] == 0:
            return
        pick = torch.randint(0, z.shape[0], (dead.numel(),), device=z.device)
        self.embed[dead] = self._norm(z[pick])
        self.embed_sum[dead] = self.embed[dead]
        self.cluster_size[dead] = 1.0
        self.unused_steps[dead] = 0
        if dist.is_available() and dist.is_initialized():
            # ranks saw different vectors: keep rank 0's choice everywhere
            for buf in (self.embed, self.embed_sum, self.cluster_size, self.unused_steps):
                dist.broadcast(buf, 0)

    def encode(self, x):
        z = self._norm(self.down(x).float())
        return self._nearest(z.reshape(-1, z.shape[-1])).view(z.shape[:-1])

    def decode(self, indices):
        return self.up(self.embed[indices.long()])


def build_quantizer(cfg: QuantizerConfig, dim: int) -> Quantizer:
    """The quantiser of `cfg.kind` for `dim`-wide encoder outputs."""
    if cfg.kind != "fsq" and cfg.whiten:
        raise CosyError(f"config key 'model.quantizer.whiten' applies to kind 'fsq' only, not '{cfg.kind}'")
    if cfg.kind == "vq":
        return VQ(dim, cfg)
    if cfg.kind == "fsq":
        return FSQ(dim, list(cfg.levels), cfg.whiten)
    return NoQuantizer()


def codebook_usage(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """Usage statistics of a flat tensor of codes.

    used_fraction: share of the codebook that occurs at least once; entropy (bits) of the
    empirical code distribution; perplexity = 2**entropy (the number of equally likely codes
    that would give the same entropy; codebook_size at best).
    """
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).double()
    probs = counts / counts.sum().clamp(min=1)
    nonzero = probs[probs > 0]
    entropy = max(float(-(nonzero * nonzero.log2()).sum()), 0.0)  # no "-0.0" for one code
    return {
        "used_fraction": float((counts > 0).sum()) / codebook_size,
        "entropy_bits": entropy,
        "perplexity": 2.0 ** entropy,
    }
