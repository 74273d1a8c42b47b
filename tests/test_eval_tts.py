import json
import logging
import shutil

import numpy as np
import soundfile as sf
import pytest

from cosy.cli import main
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError
from cosy.eval.speaker import identified_utterances, nearest_speakers, nearest_speakers_of_means
from cosy.eval.tts import evaluate


def _hyp_dir(path, data, source_of):
    """Write <utt>.wav copied from the recording `source_of(utt)` and a same-speaker utt2prompt."""
    path.mkdir()
    lines = []
    for utt in data.utts:
        shutil.copy(data.wav[source_of(utt)], path / f"{utt}.wav")
        same = [u for u in data.spk2utt[data.utt2spk[utt]] if u != utt]
        lines.append(f"{utt} {same[0]}")
    (path / "utt2prompt").write_text("\n".join(lines) + "\n")
    return path


def test_copies_of_the_recordings_score_like_the_recordings(tiny_corpus, tmp_path):
    test = tiny_corpus / "test"
    data = DataDir.load(test)
    hyp = _hyp_dir(tmp_path / "copy", data, lambda u: u)
    out = tmp_path / "reports" / "copy.v2"  # a folder that does not exist yet; a dot in the prefix
    assert main(["eval", "tts", "--hyp-dir", str(hyp), "--data", str(test), "--no-mos", "--out", str(out)]) == 0
    report = json.loads((out.parent / "copy.v2.json").read_text())
    synth, truth = report["synthesised"], report["ground_truth"]
    assert synth["wer"] == truth["wer"] and synth["hypotheses"] == truth["hypotheses"]
    assert synth["sim_resemblyzer"] == pytest.approx(truth["sim_resemblyzer"], abs=1e-6)
    assert synth["spk_id_resemblyzer"] == 1.0 and synth["spk_mean_id_resemblyzer"] == 1.0
    table = (out.parent / "copy.v2.md").read_text()
    assert "| synthesised |" in table
    for spk, row in synth["per_speaker"].items():
        assert row["closest_resemblyzer"] == spk and row["spk_id_resemblyzer"] == 1.0
        assert f"| {spk} | {row['utterances']} | {row['sim_resemblyzer']:.2f} | 100.00 | {spk} |" in table


def test_wrong_voices_are_caught_by_the_speaker_judges(tiny_corpus, tmp_path):
    test = tiny_corpus / "test"
    data = DataDir.load(test)
    speakers = list(data.spk2utt)
    # each output is a recording of the *other* test speaker
    other = {u: data.spk2utt[speakers[1 - speakers.index(data.utt2spk[u])]][0] for u in data.utts}
    report = evaluate(_hyp_dir(tmp_path / "swap", data, other.get), test, mos=False)
    assert report["synthesised"]["spk_id_resemblyzer"] == 0.0
    assert report["synthesised"]["spk_mean_id_resemblyzer"] == 0.0
    assert report["synthesised"]["sim_resemblyzer"] < report["ground_truth"]["sim_resemblyzer"] - 0.05
    # by speaker: each speaker's outputs are taken for the other speaker
    per_speaker = report["synthesised"]["per_speaker"]
    assert {spk: row["closest_resemblyzer"] for spk, row in per_speaker.items()} == dict(zip(speakers, speakers[::-1]))
    assert all(row["spk_id_resemblyzer"] == 0.0 for row in per_speaker.values())
    assert sum(row["utterances"] for row in per_speaker.values()) == len(data.utts)
    assert report["ground_truth"]["per_speaker"][speakers[0]]["closest_resemblyzer"] == speakers[0]


def test_bad_hypothesis_dirs_are_named(tiny_corpus, tmp_path, capsys):
    with pytest.raises(CosyError, match="hypothesis dir not found"):
        evaluate(tmp_path / "nowhere", tiny_corpus / "test", mos=False)
    # the default report prefix lies in the hypothesis dir: a mistyped one is not created
    assert main(["eval", "tts", "--hyp-dir", str(tmp_path / "typo"), "--data", str(tiny_corpus / "test"),
                 "--no-mos"]) == 1
    assert "hypothesis dir not found" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CosyError, match="no <utt>.wav"):
        evaluate(tmp_path / "empty", tiny_corpus / "test", mos=False)
    data = DataDir.load(tiny_corpus / "test")
    hyp = _hyp_dir(tmp_path / "typo_prompts", data, lambda u: u)
    (hyp / "utt2prompt").write_text(f"nobody {data.utts[0]}\n")
    with pytest.raises(CosyError, match="utt2prompt:1: expected"):
        evaluate(hyp, tiny_corpus / "test", mos=False)


def test_an_unreadable_output_is_scored_as_empty_and_the_rest_completes(tiny_corpus, tmp_path, caplog):
    test = tiny_corpus / "test"
    data = DataDir.load(test)
    hyp = _hyp_dir(tmp_path / "broken", data, lambda u: u)
    broken = data.utts[0]
    (hyp / f"{broken}.wav").write_bytes(b"not audio at all")
    (hyp / "stranger.wav").write_bytes((hyp / f"{broken}.wav").read_bytes())
    with caplog.at_level(logging.WARNING):
        report = evaluate(hyp, test, mos=False)
    assert f"output {broken}: cannot read audio" in caplog.text
    assert "1 wav(s) in" in caplog.text and "e.g. stranger" in caplog.text
    synth, truth = report["synthesised"], report["ground_truth"]
    assert synth["hypotheses"][broken] == ""
    assert all(synth["hypotheses"][u] == truth["hypotheses"][u] for u in data.utts[1:])
    assert synth["wer"] > truth["wer"]
    assert synth["spk_id_resemblyzer"] == pytest.approx((len(data.utts) - 1) / len(data.utts))


def test_speaker_means_decide_where_single_outputs_are_ambiguous():
    """Speaker a's two outputs: one clearly a, one slightly nearer b. Per output, half are
    identified; on average a's outputs are still nearer a. Speaker b's outputs are all a."""
    unit = lambda v: np.asarray(v, dtype=float) / np.linalg.norm(v)  # noqa: E731
    data = DataDir(wav={u: u for u in ("a1", "a2", "b1", "b2")}, text={u: "" for u in ("a1", "a2", "b1", "b2")},
                   utt2spk={"a1": "a", "a2": "a", "b1": "b", "b2": "b"})
    reference = {"a1": unit([1, 0]), "a2": unit([1, 0]), "b1": unit([0, 1]), "b2": unit([0, 1])}
    outputs = {"a1": unit([1, 0.1]), "a2": unit([0.9, 1]), "b1": unit([1, 0.2]), "b2": unit([1, 0.3])}
    assert nearest_speakers(data, outputs, reference, {}) == {"a1": "a", "a2": "b", "b1": "a", "b2": "a"}
    assert identified_utterances(data, outputs, reference, {}) == {"a1": True, "a2": False, "b1": False,
                                                                   "b2": False}
    assert nearest_speakers_of_means(data, outputs, reference) == {"a": "a", "b": "a"}
    silent = {u: np.zeros(2) for u in outputs}  # judged as no speech: resembles no one
    assert nearest_speakers_of_means(data, silent, reference) == {"a": None, "b": None}
    assert identified_utterances(data, silent, reference, {}) == {u: False for u in outputs}


def test_a_speaker_without_a_third_recording_is_warned_about(caplog):
    unit = lambda v: np.asarray(v, dtype=float) / np.linalg.norm(v)  # noqa: E731
    utts = ("a1", "a2", "b1", "b2")
    data = DataDir(wav={u: u for u in utts}, text={u: "" for u in utts},
                   utt2spk={"a1": "a", "a2": "a", "b1": "b", "b2": "b"})
    reference = {"a1": unit([1, 0]), "a2": unit([1, 0]), "b1": unit([0, 1]), "b2": unit([0, 1])}
    # a1 prompted by a2: speaker a has no third recording, so those two make its centroid
    with caplog.at_level(logging.WARNING):
        nearest = nearest_speakers(data, {"a1": unit([1, 0.1]), "b1": unit([0.1, 1])}, reference,
                                   {"a1": "a2", "b1": "b2"})
    assert nearest == {"a1": "a", "b1": "b"}
    assert "speaker a has no usable recording besides it and its prompt" in caplog.text


def test_a_non_finite_judge_vector_is_refused_and_reports_write_nan_as_null(tmp_path):
    from cosy.eval.report import write_report
    from cosy.eval.speaker import _finite

    judge = _finite("cosy", lambda samples, rate: np.full(4, np.nan))
    with pytest.raises(CosyError, match="the cosy judge gave a non-finite vector for 0.030 s of audio"):
        judge(np.zeros(480), 16000)
    write_report(tmp_path / "r", {"sim": float("nan"), "rows": [{"x": float("inf")}]}, "")
    assert json.loads((tmp_path / "r.json").read_text()) == {"sim": None, "rows": [{"x": None}]}


def test_judging_in_two_processes_gives_the_serial_report(tiny_corpus, tmp_path):
    test = tiny_corpus / "test"
    data = DataDir.load(test)
    hyp = _hyp_dir(tmp_path / "copy", data, lambda u: data.utts[(data.utts.index(u) + 1) % len(data.utts)])
    serial = evaluate(hyp, test, mos=False)
    parallel = evaluate(hyp, test, mos=False, num_jobs=2)
    assert parallel.keys() == serial.keys()
    for system in ("ground_truth", "synthesised"):
        numbers, ours = dict(serial[system]), dict(parallel[system])
        assert ours.pop("hypotheses") == numbers.pop("hypotheses")
        # one torch thread per worker may round differently from the serial run's several
        by_speaker, expected = ours.pop("per_speaker"), numbers.pop("per_speaker")
        assert by_speaker.keys() == expected.keys()
        for spk, row in expected.items():
            assert by_speaker[spk] == pytest.approx(row, abs=1e-6)  # closest_ names compared exactly
        assert ours == pytest.approx(numbers, abs=1e-6)
    with pytest.raises(CosyError, match="--num-jobs must be at least 1"):
        evaluate(hyp, test, mos=False, num_jobs=0)


def test_a_judge_that_cannot_load_fails_by_name_in_worker_processes(tiny_corpus, tmp_path):
    test = tiny_corpus / "test"
    hyp = _hyp_dir(tmp_path / "copy", DataDir.load(test), lambda u: u)
    with pytest.raises(CosyError, match="no-such-model"):
        evaluate(hyp, test, speaker_model=str(tmp_path / "no-such-model.safetensors"), mos=False, num_jobs=2)


# resemblyzer's loudness normalisation divides by the zero loudness of silence
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_silent_recording_is_left_out_of_the_speaker_centroids(tiny_corpus, tmp_path, caplog):
    test = tmp_path / "test"
    shutil.copytree(tiny_corpus / "test", test)
    data = DataDir.load(test)
    silent = data.utts[0]
    rate = sf.info(data.wav[silent]).samplerate
    copy = tmp_path / "silent.wav"
    sf.write(copy, np.zeros(rate), rate)
    (test / "wav.scp").write_text("".join(f"{u} {copy if u == silent else data.wav[u]}\n" for u in data.utts))
    hyp = _hyp_dir(tmp_path / "hyp", DataDir.load(tiny_corpus / "test"), lambda u: u)
    report = evaluate(hyp, test, mos=False)
    assert f"recording {silent}: resemblyzer judge: no speech" in caplog.text
    assert "left out of the speaker centroids" in caplog.text
    # the silent recording identifies nobody; the real copy of it in the outputs still does
    assert report["ground_truth"]["spk_id_resemblyzer"] == pytest.approx((len(data.utts) - 1) / len(data.utts))
    assert report["synthesised"]["spk_id_resemblyzer"] == 1.0
