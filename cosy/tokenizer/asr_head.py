"""ASR head of the S3 tokenizer: CTC over BPE ids and an attention decoder.

The tokens are trained by this head's loss alone, which is what makes them carry the
content of the speech and little of the speaker.

The attention decoder is a decoder-only transformer that reads the encoder output as a
prefix: the sequence is [memory frames, sos, y_1 .. y_L]; memory frames attend to each
other, text positions to every memory frame and causally to earlier text. It is built
from cosy's shared `EncoderLayer` with rotary positions (memory frame t at position t,
text token j at position memory_length + j), so no separate cross-attention block is
needed and a row's loss does not depend on the padding of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosy.modules import EncoderConfig, EncoderLayer, ensure_visible, lengths_to_mask


@dataclass
class DecoderConfig:
    """Size of the attention decoder; n_layers 0 trains with CTC only."""

    d_model: int = 256
    n_heads: int = 4
    ffn_dim: int = 1024
    n_layers: int = 3
    dropout: float = 0.1
    label_smoothing: float = 0.1


def ctc_loss(logits: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor, blank: int) -> Tensor:
    """logits: (batch, frames, vocab+1); targets: (batch, max_len) padded with -1.

    Summed over each utterance and averaged over the batch; utterances too short for
    their transcript contribute 0 instead of infinity.
    """
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)
    loss = F.ctc_loss(log_probs, targets.clamp(min=0), lengths, target_lengths, blank=blank,
                      reduction="sum", zero_infinity=True)
    return loss / logits.shape[0]


def greedy_ctc(logits: Tensor, lengths: Tensor, blank: int) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks. logits: (batch, frames, vocab+1)."""
    best = logits.argmax(-1)
    out = []
    for row, n in zip(best.tolist(), lengths.tolist()):
        ids, previous = [], blank
        for token in row[:n]:
            if token != previous and token != blank:
                ids.append(token)
            previous = token
        out.append(ids)
    return out


class AttentionDecoder(nn.Module):
    """Predicts y_1 .. y_L, eos from the encoder output (batch, frames, memory_dim)."""

    def __init__(self, cfg: DecoderConfig, memory_dim: int, vocab_size: int):
        super().__init__()
        layer_cfg = EncoderConfig(input_size=cfg.d_model, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                  ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, input_layer="none",
                                  pos_enc="rotary", layer="transformer")
        self.sos = self.eos = vocab_size
        self.label_smoothing = cfg.label_smoothing
        self.memory_proj = nn.Linear(memory_dim, cfg.d_model)
        self.embed = nn.Embedding(vocab_size + 1, cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(layer_cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, vocab_size + 1)

    def forward(self, memory: Tensor, memory_lengths: Tensor, targets: Tensor,
                target_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """targets: (batch, max_len) padded with -1 -> (label-smoothed loss, token accuracy)."""
        batch, frames = memory.shape[:2]
        text_len = targets.shape[1] + 1
        start = torch.full((batch, 1), self.sos, dtype=torch.long, device=targets.device)
        inputs = torch.cat([start, targets.clamp(min=0)], dim=1)
        # eos goes right after each row's last real token; the rest stays -1 (ignored)
        padded = torch.cat([targets, torch.full_like(start, -1)], dim=1)
        outputs = padded.scatter(1, target_lengths[:, None], self.eos)

        x = torch.cat([self.memory_proj(memory), self.embed(inputs)], dim=1)
        text_positions = memory_lengths[:, None] + torch.arange(text_len, device=x.device)
        positions = torch.cat([torch.arange(frames, device=x.device).expand(batch, -1), text_positions], dim=1)
        mask = self._mask(memory_lengths, frames, target_lengths + 1, text_len)
        valid = torch.cat([lengths_to_mask(memory_lengths, frames), lengths_to_mask(target_lengths + 1, text_len)], 1)
        for layer in self.layers:
            x = layer(x, mask, valid, None, positions)
        logits = self.out(self.norm(x[:, frames:]))
        loss = F.cross_entropy(logits.float().flatten(0, 1), outputs.flatten(), ignore_index=-1,
                               label_smoothing=self.label_smoothing)
        real = outputs >= 0
        accuracy = (logits.argmax(-1)[real] == outputs[real]).float().mean()
        return loss, accuracy

    @staticmethod
    def _mask(memory_lengths: Tensor, frames: int, text_lengths: Tensor, text_len: int) -> Tensor:
        """(batch, frames + text_len, frames + text_len) bool, True = may attend."""
        memory_keys = lengths_to_mask(memory_lengths, frames)[:, None, :].expand(-1, frames + text_len, -1)
        causal = torch.ones(text_len, text_len, dtype=torch.bool, device=memory_lengths.device).tril()
        text_keys = lengths_to_mask(text_lengths, text_len)[:, None, :] & causal
        no_text = torch.zeros(memory_lengths.shape[0], frames, text_len, dtype=torch.bool, device=causal.device)
        return ensure_visible(torch.cat([memory_keys, torch.cat([no_text, text_keys], dim=1)], dim=2))
