"""Text-to-speech-token language model (v1 transformer or Hugging Face backbone)."""

from cosy.llm.model import LLM, LLMConfig
from cosy.llm.sampling import SamplingConfig

__all__ = ["LLM", "LLMConfig", "SamplingConfig"]
