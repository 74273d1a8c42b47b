"""A synthetic multi-speaker English corpus built from Debian's speech synthesisers.

Every stage of cosy can then be trained and tested on a machine without downloads.
Sentences come from the fortune files under /usr/share/games/fortunes (packages
fortunes-min and fortunes); voices from espeak-ng (accents x variants), flite, festival
and, when installed, espeak-ng's mbrola voices. One engine voice becomes several speakers
through sox pitch and tempo changes (sox `pitch` also moves the formants, so the timbre
changes with it); each speaker's recipe is written to DIR/speakers.json.

Splits: train; dev (train speakers, sentences unseen in train); test (unseen speakers
and unseen sentences: the zero-shot set). Everything is drawn from seeded RNGs and each
speaker is rendered independently, so a seed gives the same corpus whatever the
number of jobs.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cosy.audio import save_audio
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError

SAMPLE_RATE = 22050
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Prose categories only: the others are code, ASCII art, or jokes about groups of people.
FORTUNE_FILES = ("fortunes", "literature", "riddles", "wisdom", "people", "platitudes", "education",
                 "science", "work", "humorists", "love", "food", "pets", "sports", "kids", "tao",
                 "songs-poems", "miscellaneous", "medicine", "law")
# Human-sounding espeak-ng variants; the robotic, whispering and joke ones are left out.
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Alicia",
                   "Andrea", "Annie", "aunty", "belinda", "benjamin", "david", "edward", "john", "linda",
                   "paul", "quincy", "rob", "robert", "steph")
# Left out: awb_time, a limited-domain voice that can only say the time (it garbles
# anything else), and kal, the 8 kHz build of kal16.
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
FESTIVAL_VOICES = ("kal_diphone",)
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices/english")
MBROLA_DIR = Path("/usr/share/mbrola")
# Share of speakers per engine; espeak-ng has the most distinct base voices.
ENGINE_WEIGHTS = {"espeak-ng": 0.45, "flite": 0.3, "festival": 0.1, "mbrola": 0.15}
# Semitone offsets for the k-th speaker made from one base voice, so clones stay apart.
PITCH_STEPS = (0, 3, -3, 5, -5, 2, -2, 4, -4, 6, -6)
# An extra train speaker this near (semitones) to a test speaker made from the same engine
# voice would be that test speaker, and the test set would no longer be unseen.
TEST_VOICE_MARGIN = 1.5
MIN_WORDS, MAX_WORDS = 4, 30
TRIM_DB = 40.0        # frames this far below the loudest frame count as silence
TRIM_PAD_S = 0.1      # silence kept at each end
MIN_VOICED_S = 0.3    # shorter output means the engine said nothing useful
PEAK = 0.9


@dataclass(frozen=True)
class CorpusSize:
    train_speakers: int
    test_speakers: int
    train_utts: int   # per train speaker
    dev_utts: int     # per train speaker
    test_utts: int    # per test speaker
    # More voices at the same hours: `extra_speakers` more train speakers continue the speaker
    # plan after the test ones, and every train speaker keeps `kept_train_utts` of its train
    # lines. The other draws are untouched, so the test set is that of the size without them.
    extra_speakers: int = 0
    kept_train_utts: int | None = None


SIZES = {
    "tiny": CorpusSize(train_speakers=6, test_speakers=2, train_utts=4, dev_utts=1, test_utts=3),
    "default": CorpusSize(train_speakers=30, test_speakers=8, train_utts=300, dev_utts=10, test_utts=40),
    "wide": CorpusSize(train_speakers=30, test_speakers=8, train_utts=300, dev_utts=10, test_utts=40,
                       extra_speakers=30, kept_train_utts=150),
}


@dataclass(frozen=True)
class Speaker:
    """How one speaker is made: an engine voice, then sox pitch (semitones) and tempo (factor)."""

    id: str
    engine: str
    voice: str
    variant: str
    pitch: float
    tempo: float
    split: str


def clean_sentence(sentence: str) -> str | None:
    """The sentence if it is plain ASCII prose of 4-30 words without digits, else None."""
    sentence = " ".join(sentence.replace('"', "").split())
    sentence = re.sub(r"([!?.])[!?.]+", r"\1", sentence)
    if "--" in sentence or not re.fullmatch(r"[A-Za-z][A-Za-z ,.;:!?'-]*[.!?]", sentence):
        return None
    # Capitalised words are acronyms or shouting, which engines spell out letter by letter,
    # and "Q: ..." is a dialogue tag, not speech.
    if re.search(r"\b[A-Z]{2,}\b|\b[A-Z]:", sentence):
        return None
    return sentence if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS else None


def collect_sentences(folder: Path = FORTUNE_DIR) -> list[str]:
    """Clean, deduplicated sentences of the installed fortune files, sorted."""
    seen: dict[str, str] = {}
    for name in FORTUNE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        for fortune in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            for piece in re.split(r"(?<=[.!?])\s+", " ".join(fortune.split())):
                sentence = clean_sentence(piece)
                if sentence:
                    seen.setdefault(re.sub(r"[^a-z ]", "", sentence.lower()), sentence)
    if not seen:
        raise CosyError(f"no usable sentences under {folder}: install fortunes-min (tools/setup.sh)")
    return sorted(seen.values())


def available_voices() -> dict[str, list[tuple[str, str]]]:
    """Base voices per installed engine as (voice, variant) pairs, in a fixed order."""
    voices: dict[str, list[tuple[str, str]]] = {}
    if shutil.which("espeak-ng"):
        listing = _run(["espeak-ng", "--voices=en"]).splitlines()[1:]
        variants = {line.split()[4].split("/")[-1] for line in _run(["espeak-ng", "--voices=variant"]).splitlines()[1:]}
        accents = sorted({line.split()[1] for line in listing if line.split()[4].startswith("gmw/")})
        voices["espeak-ng"] = [(a, v) for a in accents for v in ESPEAK_VARIANTS if v in variants]
        mbrola = sorted(line.split()[4].split("/")[-1] for line in listing if line.split()[4].startswith("mb/"))
        if shutil.which("mbrola"):
            voices["mbrola"] = [(name, "") for name in mbrola if _mbrola_installed(name)]
    if shutil.which("flite"):
        installed = _run(["flite", "-lv"]).split(":")[-1].split()
        voices["flite"] = [(v, "") for v in FLITE_VOICES if v in installed]
    if shutil.which("festival"):
        voices["festival"] = [(v, "") for v in FESTIVAL_VOICES if (FESTIVAL_VOICE_DIR / v).is_dir()]
    return {engine: pairs for engine, pairs in voices.items() if pairs}


def plan_speakers(count: int, num_test: int, voices: dict[str, list[tuple[str, str]]],
                  rng: random.Random) -> list[Speaker]:
    """`count` speakers spread over the engines by ENGINE_WEIGHTS; the last `num_test` are test."""
    if not voices:
        raise CosyError("no speech synthesiser found: install espeak-ng, flite or festival (tools/setup.sh)")
    engines = sorted(voices)
    pools = {e: rng.sample(voices[e], len(voices[e])) for e in engines}
    total = sum(ENGINE_WEIGHTS[e] for e in engines)
    taken = dict.fromkeys(engines, 0)
    uses: dict[tuple[str, str, str], int] = {}
    speakers = []
    for index in range(count):
        # Largest deficit against the engine's share goes next (deterministic, well spread).
        engine = max(engines, key=lambda e: ENGINE_WEIGHTS[e] / total * (index + 1) - taken[e])
        voice, variant = pools[engine][taken[engine] % len(pools[engine])]
        taken[engine] += 1
        k = uses.get((engine, voice, variant), 0)
        uses[(engine, voice, variant)] = k + 1
        pitch = round(PITCH_STEPS[k % len(PITCH_STEPS)] + rng.uniform(-1.0, 1.0), 1)
        tempo = round(rng.uniform(0.85, 1.15), 2)
        split = "test" if index >= count - num_test else "train"
        speakers.append(Speaker(f"spk{index:03d}", engine, voice, variant, pitch, tempo, split))
    return speakers


def plan_corpus(plan: CorpusSize, seed: int, voices: dict[str, list[tuple[str, str]]],
                sentences: list[str]) -> list[tuple[Speaker, list[tuple[str, str, str]]]]:
    """Every speaker with the `(split, utt, text)` lines it will say; cheap, renders nothing."""
    rng = random.Random(seed)
    count = plan.train_speakers + plan.test_speakers
    speakers = plan_speakers(count, plan.test_speakers, voices, rng)

    sentences = list(sentences)
    rng.shuffle(sentences)
    ids = {s: i for i, s in enumerate(sorted(sentences))}
    n_dev = max(plan.dev_utts, len(sentences) // 20)
    n_test = max(plan.test_utts, len(sentences) // 20)
    pools = {"dev": sentences[:n_dev], "test": sentences[n_dev:n_dev + n_test], "train": sentences[n_dev + n_test:]}
    if len(pools["train"]) < plan.train_utts:
        raise CosyError(f"only {len(sentences)} usable sentences under {FORTUNE_DIR}: --size needs "
                        f"{plan.train_utts} train sentences per speaker beyond its dev and test pools "
                        "(install the fortunes package)")

    def draw(spk: Speaker, wanted: list[tuple[str, int]], draw_rng: random.Random) -> list[tuple[str, str, str]]:
        return [(split, f"{spk.id}-{ids[s]:05d}", s) for split, n in wanted for s in draw_rng.sample(pools[split], n)]

    planned = []
    for spk in speakers:
        wanted = [("test", plan.test_utts)] if spk.split == "test" else [("train", plan.train_utts),
                                                                          ("dev", plan.dev_utts)]
        planned.append((spk, draw(spk, wanted, rng)))
    kept = plan.train_utts if plan.kept_train_utts is None else plan.kept_train_utts

    def keep_part(spk: Speaker, lines: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        # Seeded by the speaker alone: the lines it picks from already depend on the seed.
        train = sorted((line for line in lines if line[0] == "train"), key=lambda line: line[1])
        return random.Random(spk.id).sample(train, kept) + [line for line in lines if line[0] != "train"]

    if kept < plan.train_utts:
        planned = [(spk, keep_part(spk, lines) if spk.split == "train" else lines) for spk, lines in planned]
    if not plan.extra_speakers:
        return planned
    # A longer plan from the same seed starts with the same speakers (plan_speakers picks
    # by index), so its tail continues this one.
    longer = plan_speakers(count + plan.extra_speakers, plan.test_speakers, voices, random.Random(seed))
    tests = [spk for spk in speakers if spk.split == "test"]
    extra_rng = random.Random(seed + 1)
    for spk in longer[count:]:
        # Pitches are in tenths of a semitone; compare them so, not in binary floats.
        if any((t.engine, t.voice, t.variant) == (spk.engine, spk.voice, spk.variant)
               and round(10 * abs(t.pitch - spk.pitch)) < 10 * TEST_VOICE_MARGIN for t in tests):
            continue
        spk = replace(spk, split="train")
        planned.append((spk, draw(spk, [("train", kept), ("dev", plan.dev_utts)], extra_rng)))
    return planned


def build_corpus(out: str | Path, size: str = "tiny", seed: int = 0, num_jobs: int = 1) -> dict:
    """Build the corpus under `out`; returns the build report (also written to out/report.json)."""
    if size not in SIZES:
        raise CosyError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if num_jobs < 1:
        raise CosyError(f"--num-jobs must be at least 1, got {num_jobs}")
    if not shutil.which("sox"):
        raise CosyError("sox is not installed (tools/setup.sh installs it)")
    start = time.time()
    out = _prepare_out(Path(out))
    planned = plan_corpus(SIZES[size], seed, available_voices(), collect_sentences())
    jobs = [(spk, lines, out / "wavs" / spk.id) for spk, lines in planned]
    # Threads suffice: the engines and sox run as child processes.
    with ThreadPoolExecutor(num_jobs) as pool:
        results = list(pool.map(lambda job: render_speaker(*job), jobs))

    splits = {name: DataDir({}, {}, {}, utt2dur={}) for name in ("train", "dev", "test")}
    dropped = []
    for (spk, _, _), (kept, failed) in zip(jobs, results):
        dropped += [{"utt": utt, "speaker": spk.id, "engine": spk.engine, "voice": spk.voice,
                     "variant": spk.variant, "reason": reason} for utt, reason in failed]
        for split, utt, text, path, seconds in kept:
            data = splits[split]
            data.wav[utt], data.text[utt], data.utt2spk[utt], data.utt2dur[utt] = str(path), text, spk.id, seconds
    for name, data in splits.items():
        data.save(out / name)

    speakers = [spk for spk, _ in planned]
    kept_speakers = {s for data in splits.values() for s in data.utt2spk.values()}
    (out / "speakers.json").write_text(json.dumps([asdict(s) for s in speakers], indent=1) + "\n")
    hours = sum(sum(d.utt2dur.values()) for d in splits.values()) / 3600
    report = {
        "size": size, "seed": seed,
        "utterances": {name: len(d.wav) for name, d in splits.items()},
        "speakers": {name: len(set(d.utt2spk.values())) for name, d in splits.items()},
        "hours": round(hours, 3),
        "build_seconds": round(time.time() - start, 1), "num_jobs": num_jobs,
        "dropped_utterances": dropped,
        "dropped_speakers": [asdict(s) for s in speakers if s.id not in kept_speakers],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def render_speaker(speaker: Speaker, lines: list[tuple[str, str, str]],
                   wav_dir: Path) -> tuple[list[tuple[str, str, str, Path, float]], list[tuple[str, str]]]:
    """Synthesise `(split, utt, text)` lines as one speaker.

    Returns kept `(split, utt, text, wav path, seconds)` and dropped `(utt, reason)`.
    """
    wav_dir.mkdir(parents=True, exist_ok=True)
    kept, dropped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        raw = [Path(tmp) / f"{utt}.wav" for _, utt, _ in lines]
        _synthesise(speaker, [text for _, _, text in lines], raw)
        for (split, utt, text), raw_path in zip(lines, raw):
            try:
                samples = _postprocess(raw_path, speaker)
            except ValueError as err:
                dropped.append((utt, str(err)))
                continue
            path = wav_dir / f"{utt}.wav"
            save_audio(path, samples, SAMPLE_RATE)
            kept.append((split, utt, text, path, len(samples) / SAMPLE_RATE))
    return kept, dropped


def _synthesise(speaker: Speaker, texts: list[str], paths: list[Path]) -> None:
    """Engine output for each text; a failed utterance just leaves its file missing."""
    if speaker.engine == "festival":
        # One process for all lines: festival takes longer to start than to speak a sentence.
        script = [f"(voice_{speaker.voice})"]
        quoted = [t.replace("\\", "\\\\").replace('"', '\\"') for t in texts]
        script += [f'(utt.save.wave (SynthText "{t}") "{p}" \'riff)' for t, p in zip(quoted, paths)]
        scm = paths[0].with_name("lines.scm")
        scm.write_text("\n".join(script) + "\n")
        subprocess.run(["festival", "--batch", str(scm)], capture_output=True, check=False)
        return
    for text, path in zip(texts, paths):
        if speaker.engine == "flite":
            cmd, stdin = ["flite", "-voice", speaker.voice, "-t", text, "-o", str(path)], None
        else:
            voice = speaker.voice + (f"+{speaker.variant}" if speaker.variant else "")
            cmd, stdin = ["espeak-ng", "-v", voice, "-w", str(path), "--stdin"], text
        subprocess.run(cmd, input=stdin, text=True, capture_output=True, check=False)


def _postprocess(raw: Path, speaker: Speaker) -> np.ndarray:
    """Perturb, resample to 22.05 kHz, trim, normalise; ValueError when nothing is left."""
    if not raw.is_file() or raw.stat().st_size <= 44:
        raise ValueError("the engine wrote no audio")
    effects = []
    if speaker.pitch:
        effects += ["pitch", f"{speaker.pitch * 100:.0f}"]
    if speaker.tempo != 1.0:
        effects += ["tempo", f"{speaker.tempo}"]
    # -D: no dither and -R: fixed seeds, so the output is bit-identical run to run.
    cmd = ["sox", "-D", "-R", str(raw), "-t", "f32", "-c", "1", "-", *effects, "rate", "-v", str(SAMPLE_RATE)]
    result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0:
        raise ValueError(f"sox failed: {result.stderr.decode(errors='replace').strip()}")
    samples = np.frombuffer(result.stdout, dtype="<f4")
    samples = trim_silence(samples, SAMPLE_RATE)
    if len(samples) < MIN_VOICED_S * SAMPLE_RATE:
        raise ValueError("silent or shorter than 0.3 s after trimming")
    return samples * (PEAK / np.abs(samples).max())


def trim_silence(samples: np.ndarray, rate: int) -> np.ndarray:
    """Cut leading/trailing silence (10 ms frames TRIM_DB below the loudest), keeping TRIM_PAD_S."""
    hop = rate // 100
    frames = len(samples) // hop
    if frames == 0:
        return samples[:0]
    energy = np.sqrt(np.mean(samples[:frames * hop].reshape(frames, hop).astype(np.float64) ** 2, axis=1))
    if energy.max() < 1e-4:
        return samples[:0]
    loud = np.flatnonzero(energy > energy.max() * 10 ** (-TRIM_DB / 20))
    pad = int(TRIM_PAD_S * rate)
    return samples[max(0, loud[0] * hop - pad):min(len(samples), (loud[-1] + 1) * hop + pad)]


def _prepare_out(out: Path) -> Path:
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / "speakers.json").is_file():
            raise CosyError(f"--out {out} is a non-empty folder that is not a corpus; choose another")
        for name in ("wavs", "train", "dev", "test"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _mbrola_installed(name: str) -> bool:
    # espeak-ng voice "mb-de1-en" speaks through mbrola database "de1".
    database = name.removeprefix("mb-").removesuffix("-en")
    return (MBROLA_DIR / database).is_dir() or (MBROLA_DIR / database / database).is_file()


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
