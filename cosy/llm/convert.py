"""Reading the reference (CosyVoice v1 `TransformerLM`) LM checkpoint layout.

Name map, reference prefix -> cosy prefix; below the two encoders the ESPnet encoder
renames of `cosy.modules.transformer.ESPNET_ENCODER_RENAMES` apply
(`embed.out.0` -> `input_layer.linear`, `embed.out.1` -> `input_layer.norm`,
`encoders.N` -> `layers.N`, `self_attn` -> `attn`, `feed_forward` -> `ff`,
`norm_mha` / `norm1` -> `norm_attn`, `norm2` -> `norm_ff`).
"""

from __future__ import annotations

from torch import Tensor

from cosy.checkpoint import load_weights
from cosy.errors import CosyError
from cosy.llm.model import LLM
from cosy.modules import rename_espnet_encoder_key

V1_LLM_PREFIXES: dict[str, str] = {
    "text_embedding.": "text_embedding.",
    "text_encoder_affine_layer.": "text_proj.",
    "text_encoder.": "text_encoder.",        # + ESPnet encoder renames
    "llm_embedding.": "special_embedding.",  # row 0 = sos, row 1 = task id
    "speech_embedding.": "speech_embedding.",
    "spk_embed_affine_layer.": "spk_proj.",
    "llm_decoder.": "head.",                 # last output = eos
    "llm.": "lm.",                           # + ESPnet encoder renames
}
ENCODER_PREFIXES = ("text_encoder.", "llm.")


def rename_v1_llm_key(name: str) -> str:
    """The cosy parameter name of one reference v1 LM parameter."""
    for old, new in V1_LLM_PREFIXES.items():
        if name.startswith(old):
            rest = name[len(old):]
            return new + (rename_espnet_encoder_key(rest) if old in ENCODER_PREFIXES else rest)
    raise CosyError(f"unexpected parameter '{name}' in a CosyVoice v1 LM checkpoint")


def convert_v1_llm_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reference v1 LM state dict -> cosy `LLM` state dict (every name mapped)."""
    return {rename_v1_llm_key(name): tensor for name, tensor in state.items()}


def load_v1_llm_state(model: LLM, state: dict[str, Tensor]) -> None:
    """Load a reference v1 LM state dict; CosyError naming any missing or left-over tensor."""
    load_weights(model, convert_v1_llm_state(state), "v1 LM checkpoint")
