"""Independent judges for evaluating synthesised speech (ASR, speaker similarity, quality)."""
