"""Vocoders: mel spectrogram -> waveform (HiFi-GAN and CosyVoice's HiFT)."""
