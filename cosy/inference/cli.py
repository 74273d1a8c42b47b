"""`cosy synthesize`: text to speech in the voice of a prompt recording.

    cosy synthesize --text TEXT --prompt-wav WAV [--prompt-text TEXT] --out OUT.wav [--stream]
    cosy synthesize --text-file FILE --prompt-wav WAV --out-dir DIR      (DIR/<line number>.wav)
    cosy synthesize --manifest FILE.tsv --out-dir DIR                    (DIR/<utt>.wav)

Manifest lines are `utt<TAB>text<TAB>prompt_wav[<TAB>prompt_text]`; a relative prompt
path is taken from the manifest's folder. A manifest line whose text or prompt is
unusable is reported with its utterance id and skipped, and so is a text-file line with
nothing speakable, by its line number.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from cosy.errors import CosyError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to speak")
    source.add_argument("--text-file", help="UTF-8 file: one output file per non-empty line")
    source.add_argument("--manifest", help="TSV file: utt, text, prompt wav[, prompt text] per line")
    parser.add_argument("--prompt-wav", help="recording of the voice to use (any rate, mono or stereo, >= 1 s)")
    parser.add_argument("--prompt-text", help="transcript of --prompt-wav (enables zero-shot continuation)")
    parser.add_argument("--model-dir", help="model dir made by `cosy pack` (default: the installed model)")
    parser.add_argument("--out", help="output WAV (with --text)")
    parser.add_argument("--out-dir", help="output folder (with --text-file or --manifest)")
    parser.add_argument("--stream", action="store_true", help="synthesise chunk by chunk, writing as it goes")
    parser.add_argument("--speed", type=float, default=1.0, help="speaking rate factor (> 1 is faster)")
    parser.add_argument("--seed", type=int, help="random seed: the same seed gives the same samples")
    parser.add_argument("--batch-size", type=int, help="sentences decoded together (default: the model dir's)")
    parser.add_argument("--flow-steps", type=int, help="flow decoder solver steps (default: the model dir's)")
    parser.add_argument("--vocoder-adapt-steps", type=int, metavar="N",
                        help="fit a copy of the vocoder to each prompt in N training steps, 0: off "
                             "(default: the model dir's synthesis.vocoder_adapt_steps)")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from cosy.audio import check_audio_path
    from cosy.inference.pipeline import CosyTTS

    if args.text is not None and not args.out:
        raise CosyError("--text needs --out OUT.wav")
    if args.text is None and not args.out_dir:
        raise CosyError(f"{'--text-file' if args.text_file else '--manifest'} needs --out-dir DIR")
    if args.manifest is None and not args.prompt_wav:
        raise CosyError("--prompt-wav is required (except with --manifest, which names a prompt per line)")
    if args.stream and args.text is None:
        raise CosyError("--stream works with --text only")
    if args.flow_steps is not None and args.flow_steps < 1:
        raise CosyError(f"--flow-steps must be at least 1, got {args.flow_steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CosyError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.vocoder_adapt_steps is not None and args.vocoder_adapt_steps < 0:
        raise CosyError(f"--vocoder-adapt-steps must be at least 0, got {args.vocoder_adapt_steps}")
    if args.out:  # before the synthesis, not after it
        check_audio_path(args.out, "--out")
    tts = CosyTTS.from_pretrained(args.model_dir, args.device)
    if args.batch_size is not None:
        tts.settings.batch_size = args.batch_size
    if args.flow_steps is not None:
        tts.set_flow_steps(args.flow_steps)
    if args.vocoder_adapt_steps is not None:
        tts.settings.vocoder_adapt_steps = args.vocoder_adapt_steps
    if args.text is not None:
        return _one(tts, args)
    if args.text_file:
        return _text_file(tts, args)
    return _manifest(tts, args)


def _one(tts, args) -> int:
    import soundfile as sf

    from cosy.audio import save_audio

    if args.stream:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        start, first = time.perf_counter(), None
        chunks = tts.stream(args.text, args.prompt_wav, args.prompt_text, args.speed, args.seed)  # checks input
        with sf.SoundFile(str(out), "w", tts.sample_rate, 1, "PCM_16") as handle:
            for chunk in chunks:
                if first is None and len(chunk):
                    first = time.perf_counter() - start
                handle.write(chunk.clip(-1.0, 1.0))
        print(f"first audio after {first or 0.0:.3f} s", file=sys.stderr)
    else:
        wave, rate = tts.synthesize(args.text, args.prompt_wav, args.prompt_text, args.speed, args.seed)
        save_audio(args.out, wave, rate)
    print(f"wrote {args.out}")
    return 0


def _text_file(tts, args) -> int:
    from cosy.audio import save_audio

    path = Path(args.text_file)
    if not path.is_file():
        raise CosyError(f"--text-file: file not found: {path}")
    lines = [(n, line.strip()) for n, line in enumerate(_read_lines(path), 1) if line.strip()]
    if not lines:
        raise CosyError(f"--text-file {path} has no non-empty lines")
    width = max(4, len(str(lines[-1][0])))
    prompt = tts.prompt(args.prompt_wav, args.prompt_text)
    usable, skipped = [], []
    for n, text in lines:
        try:
            spoken = tts.spoken(text)
            tts.sentences(spoken, len(prompt.text))
            usable.append((n, spoken))
        except CosyError as err:
            log.warning("--text-file %s line %d: %s; skipped", path, n, err)
            skipped.append(str(n))
    waves = tts.synthesize_batch([text for _, text in usable], prompt, None, args.speed, args.seed) if usable else []
    for (n, _), wave in zip(usable, waves):
        save_audio(Path(args.out_dir) / f"{n:0{width}d}.wav", wave, tts.sample_rate)
    print(f"wrote {len(waves)} files to {args.out_dir}" + (f"; skipped line(s) {', '.join(skipped)}"
                                                            if skipped else ""))
    return 0 if usable else 1


def read_manifest(path: Path) -> list[tuple[str, str, str, str | None]]:
    """(utt, text, prompt wav, prompt text or None) per line; CosyError naming a bad line."""
    items = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (3, 4) or not fields[0].strip():
            raise CosyError(f"--manifest {path} line {n}: expected utt<TAB>text<TAB>prompt_wav[<TAB>prompt_text], "
                            f"got {len(fields)} field(s)")
        wav = Path(fields[2])
        wav = wav if wav.is_absolute() else path.parent / wav
        items.append((fields[0].strip(), fields[1], str(wav), fields[3] if len(fields) == 4 else None))
    if not items:
        raise CosyError(f"--manifest {path} has no entries")
    return items


def _manifest(tts, args) -> int:
    from cosy.audio import save_audio

    path = Path(args.manifest)
    if not path.is_file():
        raise CosyError(f"--manifest: file not found: {path}")
    entries = read_manifest(path)
    lines, skipped = [], []
    for utt, text, wav, prompt_text in entries:
        try:
            spoken = tts.spoken(text)
            tts.sentences(spoken)  # the text's own error, even where its prompt is bad too
        except CosyError as err:
            log.warning("utterance %s: %s; skipped", utt, err)
            skipped.append(utt)
            continue
        lines.append((utt, spoken, (wav, prompt_text)))
    # prompts are analysed as their lines come and dropped after their last line: a prompt
    # may hold a vocoder fitted to it (synthesis.vocoder_adapt_steps), too many to keep all
    last_line = {key: n for n, (_, _, key) in enumerate(lines)}
    prompts: dict[tuple[str, str | None], object] = {}
    batch, written = [], 0
    for n, (utt, spoken, key) in enumerate(lines):
        try:
            if key not in prompts:
                prompts[key] = tts.prompt(*key)
            tts.sentences(spoken, len(prompts[key].text))
        except CosyError as err:
            log.warning("utterance %s: %s; skipped", utt, err)
            skipped.append(utt)
        else:
            batch.append((utt, spoken, prompts[key]))
        if last_line[key] == n:
            prompts.pop(key, None)
        if batch and (len(batch) == max(1, tts.settings.batch_size) or n == len(lines) - 1):
            waves = tts.synthesize_batch([b[1] for b in batch], [b[2] for b in batch], None, args.speed, args.seed)
            for (name, _, _), wave in zip(batch, waves):
                save_audio(Path(args.out_dir) / f"{name}.wav", wave, tts.sample_rate)
            written, batch = written + len(batch), []
    order = {utt: n for n, (utt, *_) in enumerate(entries)}
    skipped.sort(key=order.get)
    print(f"wrote {written} files to {args.out_dir}" + (f"; skipped {len(skipped)}: {', '.join(skipped)}"
                                                         if skipped else ""))
    return 1 if not written else 0


def _read_lines(path: Path) -> list[str]:
    """Lines split at newlines alone, as the data dir readers do: str.splitlines would also
    split at form feeds and Unicode line separators inside a transcript."""
    try:
        return path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise CosyError(f"{path} is not UTF-8 text: {err}") from err
