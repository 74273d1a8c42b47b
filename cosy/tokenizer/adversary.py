"""A speaker classifier on the tokens, and a loss that trains the tokenizer to confuse it.

The ASR loss alone leaves the voice in the codes: on the mini corpus a speaker is named
from the histogram of its tokens more often than from its log-mel. Here a classifier
learns to name the training speaker of every token, and the tokenizer learns to make that
classifier's answer uniform over the speakers (domain confusion: Tzeng et al. 2015; Alvi
et al. 2018). Reversing the classifier's gradient instead (Ganin and Lempitsky 2015)
was tried first: it rewards codes that fool the classifier with confidently wrong
answers, which still name the speaker, and on the mini corpus it stalled the ASR.
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
    classifier tells apart. Utterances of other speakers do not train the classifier but
    still take part in the confusion loss, which needs no labels.
    weight: the confusion loss's weight in the tokenizer's loss. Both adversary losses are
    normalised as the CTC loss is (summed over an utterance's tokens, averaged over the
    batch), so 1.0 weighs a token's voice about as much as its transcript.
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
        -> adv: the classifier's cross-entropy (it trains the classifier only);
        confusion: KL(uniform || the classifier's posterior) (it trains the tokenizer only;
        0 when the tokens tell nothing of the speaker); adv_acc: the classifier's accuracy
        over the known speakers' tokens.
        """
        batch = tokens.shape[0]
        logits = self.classifier(tokens.detach())
        labels = speakers[:, None].expand_as(mask).masked_fill(~mask, -1)
        known = labels >= 0
        adv = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-1, reduction="sum") / batch
        frozen = {name: p.detach() for name, p in self.classifier.named_parameters()}
        log_probs = torch.func.functional_call(self.classifier, frozen, (tokens,)).float().log_softmax(-1)
        kl = -log_probs.mean(-1) - torch.log(torch.tensor(float(log_probs.shape[-1])))
        confusion = kl.masked_fill(~mask, 0).sum() / batch
        accuracy = ((logits.argmax(-1) == labels) & known).sum() / known.sum().clamp(min=1)
        return {"adv": adv, "confusion": confusion, "adv_acc": accuracy}
