"""Converters from other projects' released model files to cosy model directories.

* `cosy.convert.cosyvoice`: the released CosyVoice-300M directory (`cosy convert cosyvoice`).
"""
