"""cosy: an open, end-to-end, zero-shot text-to-speech research framework."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # CosyTTS pulls in torch and every model package: load it only when asked for
    if name == "CosyTTS":
        from cosy.inference.pipeline import CosyTTS

        return CosyTTS
    raise AttributeError(f"module 'cosy' has no attribute {name!r}")
