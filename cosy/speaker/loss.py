"""Additive angular margin softmax (ArcFace, Deng et al., 2019, arXiv 1801.07698)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AAMConfig:
    """margin: angle added to the target class (radians); scale: logit temperature.

    margin_warmup_steps: the margin grows linearly from 0 over this many training steps
    (0: full margin from the start); a large margin on an untrained network stalls it.
    """

    margin: float = 0.2
    scale: float = 32.0
    margin_warmup_steps: int = 0


class AAMSoftmax(nn.Module):
    """Cosine classifier whose target logit is cos(theta + margin), all logits times scale."""

    def __init__(self, cfg: AAMConfig, embedding_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"AAM softmax needs at least 2 speakers, got {num_classes}")
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_normal_(self.weight)
        # Counts training calls so the margin warm-up survives checkpoint/resume.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def current_margin(self) -> float:
        warmup = self.cfg.margin_warmup_steps
        if warmup <= 0:
            return self.cfg.margin
        return self.cfg.margin * min(1.0, self.step.item() / warmup)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """embeddings: (batch, embedding_dim), labels: (batch,) int64 -> {"loss", "acc"}."""
        margin = self.current_margin()
        if self.training:
            self.step += 1
        # In float32 even under autocast: bf16 resolves cosines near 1 only to about 0.004,
        # as coarse as the effect of the margin being learnt.
        with torch.autocast(embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1.0, 1.0)
        sine = (1.0 - cosine.square()).clamp_min(0.0).sqrt()
        with_margin = cosine * math.cos(margin) - sine * math.sin(margin)
        # Past theta = pi - margin, cos(theta + margin) would rise again; continue the
        # curve monotonically instead so a wrong class can never gain from the margin.
        with_margin = torch.where(cosine > math.cos(math.pi - margin), with_margin,
                                  cosine - math.sin(math.pi - margin) * margin)
        target = F.one_hot(labels, cosine.shape[1]).bool()
        logits = self.cfg.scale * torch.where(target, with_margin, cosine)
        acc = (cosine.argmax(dim=1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "acc": acc}
