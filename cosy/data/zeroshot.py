"""Zero-shot test lists: every utterance of a data dir is to be spoken again, prompted by
another utterance of the same speaker.

`write_zeroshot` writes, into one folder that later receives the synthesised wavs:

* `manifest.tsv`: `utt<TAB>text<TAB>prompt_wav<TAB>prompt_text`, the input of
  `cosy synthesize --manifest`;
* `utt2prompt`: `<utt> <prompt utt>`, read by `cosy eval tts` next to the wavs.

The prompt of an utterance is the next utterance of its speaker in sorted order (the
first one for the last), so the choice is deterministic and every utterance is also
used once as a prompt. A speaker with a single utterance has no other one to prompt
with; its utterance is left out and reported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cosy.data.kaldi import DataDir, write_table
from cosy.errors import CosyError

log = logging.getLogger(__name__)


def pick_prompts(data: DataDir) -> dict[str, str]:
    """utt -> prompt utt (same speaker, never itself), for every utt whose speaker has two or more."""
    prompts: dict[str, str] = {}
    for spk, utts in sorted(data.spk2utt.items()):
        utts = sorted(utts)
        if len(utts) < 2:
            log.warning("speaker %s has only utterance %s: no other prompt; left out", spk, utts[0])
            continue
        for i, utt in enumerate(utts):
            prompts[utt] = utts[(i + 1) % len(utts)]
    return prompts


def write_zeroshot(data_dir: str | Path, out: str | Path) -> int:
    """Write out/manifest.tsv and out/utt2prompt for `data_dir`; returns the number of lines."""
    data = DataDir.load(data_dir)
    prompts = pick_prompts(data)
    if not prompts:
        raise CosyError(f"{data_dir}: no speaker has two utterances, so no zero-shot prompt can be chosen")
    for utt, text in data.text.items():
        if "\t" in text:
            raise CosyError(f"{Path(data_dir) / 'text'}: transcript of {utt} contains a tab")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{utt}\t{data.text[utt]}\t{data.wav[p]}\t{data.text[p]}\n" for utt, p in sorted(prompts.items())]
    (out / "manifest.tsv").write_text("".join(lines), encoding="utf-8")
    write_table(out / "utt2prompt", prompts)
    return len(lines)
