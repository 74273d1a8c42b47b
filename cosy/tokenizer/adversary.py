"""A speaker classifier on the tokens, and a loss that trains the tokenizer to confuse it.

The ASR loss alone leaves the voice in the codes: on the mini corpus a speaker is named
from the histogram of its tokens more often than from its log-mel. Here a classifier
learns to name an utterance's training speaker from its tokens, and the tokenizer learns
to make that classifier's answer uniform over the speakers (domain confusion: Tzeng et
al. 2015; Alvi et al. 2018).

Two other forms were tried on the mini corpus and dropped (recipes/mini/RESULTS.md, "A
speaker adversary in the tokenizer's training"): reversing the classifier's gradient
(Ganin and Lempitsky 2015) rewards codes that fool the classifier with confidently wrong
answers, and stalled the ASR; a classifier of single tokens found almost no voice in any
one token (4% right against a chance of 3%), and at weight 1 its confusion loss stalled
the ASR too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosy.errors import CosyError


@dataclass
class SpeakerAdversaryConfig:
    """`model.adversary` of a tokenizer experiment; weight 0 (the default) turns it off.

    speakers: the training data dir's spk2utt; its first column lists the speakers the
    classifier tells apart. Utterances of other speakers do not train the classifier but
    still take part in the confusion loss, which needs no labels.
    weight: the confusion loss's weight in the tokenizer's loss. Both adversary losses are
    per utterance, averaged over the batch, while the CTC loss is summed over an
    utterance's tokens: a weight near the tokens per utterance weighs the voice about as
    much as the transcript.
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


class SpeakerAdversary(nn.Module):
    def __init__(self, cfg: SpeakerAdversaryConfig, width: int, num_speakers: int):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, num_speakers))

    def forward(self, tokens: Tensor, mask: Tensor, speakers: Tensor) -> dict[str, Tensor]:
        """tokens (batch, frames, width) from the quantiser, mask (batch, frames) true on real
        tokens, speakers (batch,) class indices, -1 for a speaker the classifier does not know
        -> adv: the classifier's cross-entropy over the known speakers (it trains the
        classifier only); confusion: KL(uniform || the classifier's posterior) over all
        utterances (it trains the tokenizer only; 0 when the tokens tell nothing of the
        speaker); adv_acc: the classifier's accuracy over the known speakers.

        The classifier sees an utterance's mean token: for VQ the mean of its codebook
        vectors, a projection of its code histogram to the token width (for FSQ, only the
        mean of each digit). One token says little of the voice, their distribution names it.
        """
        weights = mask.float()[..., None]
        pooled = (tokens.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
        known = speakers >= 0
        logits = self.classifier(pooled.detach()).float()
        # summed and divided rather than averaged: 0, not NaN, for a batch of unknown
        # speakers, with the classifier still in the graph (DDP needs every parameter used)
        adv = F.cross_entropy(logits, speakers, ignore_index=-1, reduction="sum") / known.sum().clamp(min=1)
        frozen = {name: p.detach() for name, p in self.classifier.named_parameters()}
        log_probs = torch.func.functional_call(self.classifier, frozen, (pooled,)).float().log_softmax(-1)
        confusion = (-log_probs.mean(-1) - math.log(log_probs.shape[-1])).mean()
        accuracy = ((logits.argmax(-1) == speakers) & known).sum() / known.sum().clamp(min=1)
        return {"adv": adv, "confusion": confusion, "adv_acc": accuracy}
