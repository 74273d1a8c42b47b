"""cosy: an open, end-to-end, zero-shot text-to-speech research framework."""

__version__ = "0.1.0"
