"""A speaker classifier on the tokens, trained against the tokenizer (gradient reversal).

The ASR loss alone leaves the voice in the codes: on the mini corpus a speaker is named
from the histogram of its tokens more often than from its log-mel. Here a classifier
learns to name the training speaker of every token, and the reversed gradient of its loss
pushes Encoder1 towards codes that all speakers use alike (speaker-invariant training,
Meng et al. 2018; domain-adversarial training, Ganin and Lempitsky 2015).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosy.errors import CosyError


@dataclass
class SpeakerAdversaryConfig:
    """`model.adversary` of a tokenizer experiment; weight 0 (the default) turns it off.

    speakers: the training data dir's spk2utt; its first column lists the speakers the
    classifier tells apart. Utterances of other speakers train the tokenizer as usual.
    weight: the scale of the reversed gradient that reaches the tokenizer. The classifier's
    loss is normalised as the CTC loss is (summed over an utterance's tokens, averaged over
    the batch), so 1.0 weighs a token's voice as much as its transcript.
    hidden: width of the classifier's hidden layer.
    """

    speakers: str = ""
    weight: float = 0.0
    hidden: int = 256

    def check(self, key: str) -> None:
        if self.weight < 0:
            raise CosyError(f"config key '{key}.weight' must be >= 0, got {self.weight}")
        if self.weight > 0 and self.hidden < 1:
            raise CosyError(f"config key '{key}.hidden' must be >= 1, got {self.hidden}")


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: Tensor, scale: float) -> Tensor:
    """The identity forward; backward, the gradient times -scale."""
    return _ReverseGradient.apply(x, scale)


class SpeakerAdversary(nn.Module):
    def __init__(self, cfg: SpeakerAdversaryConfig, width: int, num_speakers: int):
        super().__init__()
        self.weight = cfg.weight
        self.classifier = nn.Sequential(nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, num_speakers))

    def forward(self, tokens: Tensor, mask: Tensor, speakers: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (batch, frames, width) from the quantiser, mask (batch, frames) true on real
        tokens, speakers (batch,) class indices, -1 for a speaker the classifier does not know
        -> (loss, accuracy over the known speakers' tokens).

        The loss trains the classifier; the tokenizer below it gets its gradient reversed.
        """
        logits = self.classifier(reverse_gradient(tokens, self.weight))
        labels = speakers[:, None].expand_as(mask).masked_fill(~mask, -1)
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-1, reduction="sum")
        known = labels >= 0
        correct = (logits.argmax(-1) == labels) & known
        accuracy = correct.sum() / known.sum().clamp(min=1)
        return loss / tokens.shape[0], accuracy
