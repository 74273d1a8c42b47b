"""The training engine end to end on a tiny toy task (tests/toy_task.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cosy import cli
from cosy.errors import CosyError
from cosy.train import checkpoint
from cosy.checkpoint import read_weights
from cosy.train.checkpoint import Checkpoints, Entry, atomic_write
from cosy.train.schedule import SchedulerConfig, lr_factor
from cosy.train.tasks import get_task, register_task
from toy_task import TASK, make_rows, write_shards

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def one_thread():
    # bit-exact comparisons with subprocesses that run with OMP_NUM_THREADS=1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(path: Path, train: dict, data: dict | None = None, model: dict | None = None,
                 task: str = "toy_task:TASK") -> Path:
    path.write_text(yaml.safe_dump({"task": task, "model": model or {}, "data": data or {}, "train": train}))
    return path


def corpus(tmp_path: Path, rows: int = 48, per_shard: int = 16) -> tuple[Path, Path]:
    train = write_shards(tmp_path / "train", make_rows(rows), per_shard)
    cv = write_shards(tmp_path / "cv", make_rows(8, seed=1, prefix="cv"), 8)
    return train, cv


def train_args(conf: Path, train: Path, cv: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(conf), "--train-data", str(train), "--cv-data", str(cv), "--out", str(out),
            *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def final_weights(out: Path, name: str = "weights") -> tuple[int, dict[str, torch.Tensor]]:
    """Step and tensors of the latest checkpoint; name="ema" for its EMA weights."""
    last = Checkpoints(out).latest()
    return last.step, read_weights(out / getattr(last, name))


def torchrun(*args: str) -> None:
    """`cosy` with `args` on two ranks."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "cosy.cli", *args], env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_killed_and_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_run(tmp_path):
    train, cv = corpus(tmp_path)
    # dynamic batches, shuffle + sort buffers, accumulation, dropout, noisy processors,
    # cosine schedule, EMA and mid-epoch validation all have to resume exactly
    conf = write_config(tmp_path / "conf.yaml", data={"max_frames_in_batch": 40, "shuffle_size": 10, "sort_size": 5},
                        train={"max_epochs": 2, "accum_grad": 2, "save_every_steps": 2, "cv_every_steps": 3,
                               "log_every": 1, "ema_decay": 0.9, "keep_last": 2,
                               "scheduler": {"name": "cosine", "warmup_steps": 2, "total_steps": 12}})
    assert cli.main(train_args(conf, train, cv, tmp_path / "straight")) == 0

    killed = tmp_path / "killed"
    slow = train_args(conf, train, cv, killed, "model.sleep=0.15")
    proc = subprocess.Popen([sys.executable, "-m", "cosy.cli", *slow],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (Checkpoints(killed).latest() or Entry(0, 0, None)).step < 4:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    entry = Checkpoints(killed).latest()
    assert 4 <= entry.step < 10
    assert Checkpoints(killed).load_state(entry)["batches_done"] > 0  # stopped mid-epoch
    for listed in Checkpoints(killed).entries:  # whatever the kill interrupted, the index lists only whole files
        assert read_weights(killed / listed.weights) and read_weights(killed / listed.ema)

    assert cli.main(train_args(conf, train, cv, killed, "--resume")) == 0
    step_a, weights_a = final_weights(tmp_path / "straight")
    step_b, weights_b = final_weights(killed)
    ema_a, ema_b = final_weights(tmp_path / "straight", "ema")[1], final_weights(killed, "ema")[1]
    assert step_a == step_b == 10
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert not torch.equal(weights_a["encoder.proj.weight"], ema_a["encoder.proj.weight"])
    losses_a = [e.cv_loss for e in Checkpoints(tmp_path / "straight").entries]
    assert losses_a == [e.cv_loss for e in Checkpoints(killed).entries]
    assert "resumed from" in (killed / "train.log").read_text()
    assert not list(killed.glob(".*.tmp"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(killed / "tensorboard"))
    events.Reload()  # the steps logged between the last checkpoint and the kill are not kept twice
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))


@pytest.mark.parametrize("task", ["toy_task:TASK", "toy_task:GAN_TASK"])
def test_two_ddp_ranks_with_batch_b_match_one_process_with_batch_2b(tmp_path, task):
    # one shard and no shuffling: rank r reads rows r, r+2, ..., so the two ranks'
    # batches of 3 together are exactly the single process's batch of 6. With 37 rows
    # rank 0 holds a 7th batch that rank 1 lacks: the epoch must end on both ranks at 6.
    train = write_shards(tmp_path / "train", make_rows(37), 37)
    cv = write_shards(tmp_path / "cv", make_rows(8, seed=1, prefix="cv"), 8)
    data = {"shuffle": False, "sort": False, "batch_type": "static"}
    training = {"max_epochs": 1, "cv_every_steps": 2, "keep_last": 10, "log_every": 1,
                "optim": {"name": "adamw", "weight_decay": 0.01}}
    single = write_config(tmp_path / "single.yaml", training, {**data, "batch_size": 6}, {"dropout": 0.0}, task)
    ranks = write_config(tmp_path / "ranks.yaml", training, {**data, "batch_size": 3}, {"dropout": 0.0}, task)
    assert cli.main(train_args(single, train, cv, tmp_path / "single")) == 0
    torchrun(*train_args(ranks, train, cv, tmp_path / "ddp"))
    one = {e.step: e for e in Checkpoints(tmp_path / "single").entries}
    two = {e.step: e for e in Checkpoints(tmp_path / "ddp").entries}
    assert sorted(one) == [2, 4, 6, 7] and sorted(two) == [2, 4, 6]
    for step in (2, 4, 6):
        weights_a = read_weights(tmp_path / "single" / one[step].weights)
        weights_b = read_weights(tmp_path / "ddp" / two[step].weights)
        for key in weights_a:  # float32 sums in a different order: tolerance 1e-6
            torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=1e-6)
        assert one[step].cv_loss == pytest.approx(two[step].cv_loss, rel=1e-6)


def test_deepspeed_zero2_on_two_ranks_matches_ddp_and_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    # as in the DDP test: two ranks of 6 batches an epoch (the 7th of rank 0 dropped), here
    # accumulated in pairs, so 3 steps an epoch; then stopped mid-epoch and resumed
    train = write_shards(tmp_path / "train", make_rows(37), 37)
    cv = write_shards(tmp_path / "cv", make_rows(8, seed=1, prefix="cv"), 8)
    data = {"shuffle": False, "sort": False, "batch_type": "static", "batch_size": 3}
    training = {"max_epochs": 2, "accum_grad": 2, "cv_every_steps": 2, "cv_every_epoch": False, "keep_last": 10,
                "optim": {"name": "adamw", "weight_decay": 0.01},
                "scheduler": {"name": "cosine", "warmup_steps": 2, "total_steps": 6}}
    ddp = write_config(tmp_path / "ddp.yaml", training, data, {"dropout": 0.0})
    zero = write_config(tmp_path / "zero.yaml", {**training, "deepspeed": {"zero_stage": 2}}, data, {"dropout": 0.0})
    torchrun(*train_args(ddp, train, cv, tmp_path / "ddp"))
    torchrun(*train_args(zero, train, cv, tmp_path / "zero"))
    stopped = tmp_path / "stopped"
    torchrun(*train_args(zero, train, cv, stopped, "train.max_steps=4", "train.keep_last=1", "train.keep_best=0"))
    assert Checkpoints(stopped).load_state(Checkpoints(stopped).latest())["batches_done"] == 2  # mid-epoch
    torchrun(*train_args(zero, train, cv, stopped, "train.keep_last=1", "train.keep_best=0", "--resume"))

    plain = {e.step: e for e in Checkpoints(tmp_path / "ddp").entries}
    sharded = {e.step: e for e in Checkpoints(tmp_path / "zero").entries}
    assert sorted(plain) == sorted(sharded) == [2, 3, 4, 6]
    for step in (2, 3, 4, 6):
        weights_a = read_weights(tmp_path / "ddp" / plain[step].weights)
        weights_b = read_weights(tmp_path / "zero" / sharded[step].weights)
        for key in weights_a:  # ZeRO reduces and updates flat partitions: float32 sums in another order
            torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=1e-6)
        assert (tmp_path / "zero" / sharded[step].deepspeed).is_dir()
    step, resumed = final_weights(stopped)
    assert step == 6
    straight = read_weights(tmp_path / "zero" / sharded[6].weights)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # only the kept checkpoint's partitions are left
    assert [p.name for p in stopped.glob("step_*.deepspeed")] == ["step_6.deepspeed"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_in_one_process_steps_the_epochs_last_incomplete_accumulation(tmp_path, precision):
    pytest.importorskip("deepspeed")
    train, cv = corpus(tmp_path, rows=15, per_shard=15)  # 5 batches of 3: accumulated 2 + 2 + 1
    data = {"shuffle": False, "sort": False, "batch_type": "static", "batch_size": 3}
    training = {"max_epochs": 1, "accum_grad": 2, "cv_every_steps": 2, "keep_last": 10, "precision": precision}
    plain = write_config(tmp_path / "plain.yaml", training, data, {"dropout": 0.0})
    zero = write_config(tmp_path / "zero.yaml", {**training, "deepspeed": {"zero_stage": 1}}, data, {"dropout": 0.0})
    assert cli.main(train_args(plain, train, cv, tmp_path / "plain")) == 0
    # a process of its own: DeepSpeed sets up a process group even for one rank
    result = subprocess.run([sys.executable, "-m", "cosy.cli", *train_args(zero, train, cv, tmp_path / "zero")],
                            env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [e.step for e in Checkpoints(tmp_path / "plain").entries] == [2]  # the odd batch dropped
    assert [e.step for e in Checkpoints(tmp_path / "zero").entries] == [2, 3]  # the odd batch stepped
    weights_a = read_weights(tmp_path / "plain" / "step_2.safetensors")
    weights_b = read_weights(tmp_path / "zero" / "step_2.safetensors")
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=1e-6)


def test_an_epoch_ending_on_a_validation_step_is_validated_once(tmp_path):
    train, cv = corpus(tmp_path, rows=24, per_shard=24)  # 6 batches of 4
    conf = write_config(tmp_path / "c.yaml", {"max_epochs": 2, "cv_every_steps": 3},
                        {"shuffle": False, "sort": False, "batch_type": "static", "batch_size": 4})
    assert cli.main(train_args(conf, train, cv, tmp_path / "exp")) == 0
    log = (tmp_path / "exp" / "train.log").read_text()
    assert [log.count(f"step {step} cv") for step in (3, 6, 9, 12)] == [1, 1, 1, 1]
    # but saved again at the epoch's end, so that a resume starts epoch 1 afresh
    store = Checkpoints(tmp_path / "exp")
    step_6 = next(e for e in store.entries if e.step == 6)
    state = store.load_state(step_6)
    assert (state["epoch"], state["batches_done"], step_6.cv_loss is not None) == (1, 0, True)


def test_gradient_accumulation_of_two_batches_matches_one_double_batch(tmp_path):
    train, cv = corpus(tmp_path, rows=24, per_shard=24)
    data = {"shuffle": False, "sort": False, "batch_type": "static"}
    one = write_config(tmp_path / "one.yaml", {"max_steps": 3}, {**data, "batch_size": 8}, {"dropout": 0.0})
    two = write_config(tmp_path / "two.yaml", {"max_epochs": 2, "accum_grad": 2, "cv_every_epoch": False},
                       {**data, "batch_size": 4}, {"dropout": 0.0})
    assert cli.main(train_args(one, train, cv, tmp_path / "one")) == 0
    assert cli.main(train_args(two, train, cv, tmp_path / "two")) == 0
    _, a = final_weights(tmp_path / "one")
    steps = Checkpoints(tmp_path / "two").entries
    # 24 rows = 3 steps an epoch; the step-3 (epoch end) checkpoint has no cv loss, the last one has
    assert [(e.step, e.cv_loss is None) for e in steps] == [(3, True), (6, False)]
    b = read_weights(tmp_path / "two" / steps[0].weights)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_hardware_is_warned_about(tmp_path, monkeypatch, native):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    train, cv = corpus(tmp_path, rows=8, per_shard=8)
    conf = write_config(tmp_path / "c.yaml", {"max_steps": 1, "precision": "bf16"},
                        data={"batch_type": "static", "batch_size": 4})
    assert cli.main(train_args(conf, train, cv, tmp_path / "exp")) == 0
    warned = "without AVX512-BF16 or AMX" in (tmp_path / "exp" / "train.log").read_text()
    assert warned != native


def test_gan_task_trains_both_submodules_with_two_optimisers_in_bf16(tmp_path):
    train, cv = corpus(tmp_path, rows=16, per_shard=16)
    conf = write_config(tmp_path / "gan.yaml", task="toy_task:GAN_TASK",
                        data={"batch_type": "static", "batch_size": 4},
                        train={"max_steps": 3, "precision": "bf16", "log_every": 1,
                               "optim_d": {"name": "adam", "lr": 2e-4}})
    assert cli.main(train_args(conf, train, cv, tmp_path / "gan")) == 0
    initial = get_task("toy_task:GAN_TASK")
    torch.manual_seed(1234)  # the trainer's seed: the same initial weights
    start = initial.build(initial.config_cls()).state_dict()
    out = tmp_path / "gan"
    weights = read_weights(out / Checkpoints(out).latest().weights)
    for prefix in ("generator.", "discriminator."):
        changed = [k for k in start if k.startswith(prefix) and not torch.equal(start[k], weights[k])]
        assert changed, prefix
    state = Checkpoints(out).load_state(Checkpoints(out).latest())
    assert set(state["optimizers"]) == {"generator", "discriminator"}
    assert state["optimizers"]["discriminator"]["param_groups"][0]["lr"] == pytest.approx(2e-4)
    log = (out / "train.log").read_text()
    assert "discriminator/loss=" in log and "generator/adv=" in log and "grad_norm_generator=" in log
    assert Checkpoints(out).latest().cv_loss is not None


def test_gan_warmup_trains_the_generator_alone(tmp_path):
    train, cv = corpus(tmp_path, rows=16, per_shard=16)
    conf = write_config(tmp_path / "gan.yaml", task="toy_task:GAN_TASK", data={"batch_type": "static", "batch_size": 4},
                        train={"max_steps": 2, "gan_warmup_steps": 2, "log_every": 1})
    out = tmp_path / "gan"
    assert cli.main(train_args(conf, train, cv, out)) == 0
    initial = get_task("toy_task:GAN_TASK")
    torch.manual_seed(1234)
    start = initial.build(initial.config_cls()).state_dict()
    weights = read_weights(out / Checkpoints(out).latest().weights)
    changed = {k.split(".")[0] for k in start if not torch.equal(start[k], weights[k])}
    assert changed == {"generator"}
    log = (out / "train.log").read_text()
    assert "generator/mse=" in log and "discriminator/loss=" not in log and "generator/adv=" not in log
    # past the warmup both turns run again
    assert cli.main(train_args(conf, train, cv, out, "--resume", "train.max_steps=3")) == 0
    after = read_weights(out / Checkpoints(out).latest().weights)
    assert any(not torch.equal(weights[k], after[k]) for k in after if k.startswith("discriminator."))


def test_init_starts_a_new_run_from_another_runs_weights(tmp_path, capsys):
    train, cv = corpus(tmp_path, rows=16, per_shard=16)
    conf = write_config(tmp_path / "c.yaml", {"max_steps": 2, "cv_every_epoch": False})
    assert cli.main(train_args(conf, train, cv, tmp_path / "first")) == 0
    _, first = final_weights(tmp_path / "first")
    # one step at learning rate 0: the new run's checkpoint still holds the init weights
    weights = tmp_path / "first" / Checkpoints(tmp_path / "first").latest().weights
    assert cli.main(train_args(conf, train, cv, tmp_path / "tuned", f"train.init={weights}",
                               "train.optim.lr=0.0", "train.max_steps=1")) == 0
    step, tuned = final_weights(tmp_path / "tuned")
    assert step == 1  # the step count starts afresh
    for key in first:
        torch.testing.assert_close(tuned[key], first[key], rtol=0, atol=0)
    assert "initialised from" in (tmp_path / "tuned" / "train.log").read_text()
    wider = write_config(tmp_path / "w.yaml", {"max_steps": 1, "init": str(weights)}, model={"dim": 12})
    assert cli.main(train_args(wider, train, cv, tmp_path / "wider")) != 0
    assert "parameter 'encoder.embed.weight' has shape (16, 8) in the file" in capsys.readouterr().err


def test_outputs_config_log_and_tensorboard(tmp_path):
    train, cv = corpus(tmp_path, rows=16, per_shard=16)
    conf = write_config(tmp_path / "c.yaml", {"max_steps": 2, "log_every": 1, "scheduler": {"warmup_steps": 2}},
                        {"batch_type": "static", "batch_size": 4})
    out = tmp_path / "exp"
    assert cli.main(train_args(conf, train, cv, out, "train.optim.lr=0.5")) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["task"] == "toy_task:TASK" and saved["train"]["optim"]["lr"] == 0.5
    assert saved["model"]["dim"] == 8 and saved["data"]["max_frames_in_batch"] == 12000
    assert saved["data"]["batch_size"] == 4
    assert "grad_norm=" in (out / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/l1", "train/lr", "train/grad_norm", "train/frames_per_s", "cv/loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    # the rate each step was taken with: half the base rate, then all of it
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([0.25, 0.5])
    # a second run into the same folder without --resume must not overwrite it
    assert cli.main(train_args(conf, train, cv, out)) == 1


@pytest.mark.parametrize("case, message", [
    ("empty", "no training batches"),
    ("empty_cv", "no validation batches in"),
    ("missing_shard", "shard file not found"),
    ("unknown_key", "'train.max_stepz'"),
    ("log_every", "train.log_every must be >= 1, got 0"),
    ("ema_decay", "train.ema_decay must be in [0, 1) (0 = no EMA), got 1.0"),
    ("accum_grad", "has 2 batches on this process, fewer than train.accum_grad=3: no step is ever taken"),
    ("unknown_task", "unknown task 'vocodr' (known tasks: flow, llm, speaker, tokenizer, vocoder"),
    ("zero3", "train.deepspeed.zero_stage must be 1 or 2, got 3"),
    ("deepspeed_gan", "train.deepspeed does not train GAN tasks"),
    ("deepspeed_derived", "train.deepspeed.config sets gradient_accumulation_steps, zero_optimization.stage, "
                          "which cosy derives"),
])
def test_bad_input_fails_fast_naming_the_cause(tmp_path, capsys, case, message):
    train, cv = corpus(tmp_path, rows=8, per_shard=8)
    config = {"max_steps": 2}
    data = None
    task = "toy_task:TASK"
    if case == "empty":
        train = write_shards(tmp_path / "empty", [], 8)
    elif case == "empty_cv":
        cv = write_shards(tmp_path / "empty", [], 8)
    elif case == "missing_shard":
        Path(train.read_text().split()[0]).unlink()
    elif case == "unknown_key":
        config["max_stepz"] = 3
    elif case in ("log_every", "ema_decay"):
        config[case] = {"log_every": 0, "ema_decay": 1.0}[case]
    elif case == "accum_grad":  # 8 rows in batches of 4, without an epoch limit: it used to loop for ever
        config.update(accum_grad=3, max_epochs=0)
        data = {"batch_type": "static", "batch_size": 4}
    elif case == "zero3":
        config["deepspeed"] = {"zero_stage": 3}
    elif case == "deepspeed_derived":
        config["deepspeed"] = {"config": {"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 3}}}
    elif case == "deepspeed_gan":
        config["deepspeed"] = {}
        task = "toy_task:GAN_TASK"
    else:
        task = "vocodr"
    conf = write_config(tmp_path / "c.yaml", config, data=data, task=task)
    start = time.time()
    assert cli.main(train_args(conf, train, cv, tmp_path / "exp")) == 1
    assert message in capsys.readouterr().err
    assert time.time() - start < 20


def test_ema_turned_on_at_a_resume_starts_from_the_restored_weights_and_saves_whole_state_dicts(tmp_path):
    train, cv = corpus(tmp_path, rows=16, per_shard=16)
    conf = write_config(tmp_path / "c.yaml", {"max_steps": 2, "cv_every_epoch": False},
                        {"batch_type": "static", "batch_size": 4}, model={"batch_norm": True, "dropout": 0.0})
    out = tmp_path / "exp"
    assert cli.main(train_args(conf, train, cv, out)) == 0
    _, before = final_weights(out)
    assert cli.main(train_args(conf, train, cv, out, "--resume", "train.max_steps=3", "train.ema_decay=0.5")) == 0
    step, after = final_weights(out)
    _, ema = final_weights(out, "ema")
    assert step == 3
    assert ema.keys() == after.keys()  # BatchNorm's step counter too, so the EMA file loads as weights
    assert torch.equal(ema["encoder.norm.num_batches_tracked"], after["encoder.norm.num_batches_tracked"])
    for key, value in after.items():
        if value.is_floating_point():
            torch.testing.assert_close(ema[key], 0.5 * before[key] + 0.5 * value)


def test_resuming_mid_epoch_with_other_loader_workers_is_warned_about(tmp_path):
    train, cv = corpus(tmp_path, rows=16, per_shard=8)
    conf = write_config(tmp_path / "c.yaml", {"max_steps": 1, "max_epochs": 0},
                        {"batch_type": "static", "batch_size": 4})
    out = tmp_path / "exp"
    assert cli.main(train_args(conf, train, cv, out)) == 0
    assert Checkpoints(out).load_state(Checkpoints(out).latest())["batches_done"] == 1
    assert cli.main(train_args(conf, train, cv, out, "--resume", "train.max_steps=2", "data.num_workers=2")) == 0
    assert "with 2 data parts (processes x loader workers) instead of 1" in (out / "train.log").read_text()


def test_average_of_two_checkpoints_is_their_mean(tmp_path):
    store = Checkpoints(tmp_path)
    first = {"w": torch.randn(3, 4), "count": torch.tensor(7)}
    second = {"w": torch.randn(3, 4), "count": torch.tensor(9)}
    worst = {"w": torch.randn(3, 4), "count": torch.tensor(1)}
    for step, weights, loss in ((1, worst, 3.0), (2, first, 1.0), (3, second, 2.0)):
        store.save(Entry(step, 0, loss), weights, {"step": step}, None, keep_last=5, keep_best=5)
    out = tmp_path / "avg.safetensors"
    assert cli.main(["average", str(tmp_path), "--best", "2", "--out", str(out)]) == 0
    averaged = read_weights(out)
    torch.testing.assert_close(averaged["w"], (first["w"] + second["w"]) / 2, rtol=0, atol=1e-7)
    assert averaged["count"].item() == 7  # integer tensors come from the best checkpoint
    assert cli.main(["average", str(tmp_path / "nowhere"), "--best", "2", "--out", str(out)]) == 1


def test_checkpoints_keep_the_last_k_and_the_best_by_cv_loss(tmp_path):
    store = Checkpoints(tmp_path)
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: None, 5: 0.3, 6: 0.9}
    for step, loss in losses.items():
        store.save(Entry(step, 0, loss), {"w": torch.full((2,), float(step))}, {"step": step}, None,
                   keep_last=2, keep_best=2)
    assert [e.step for e in Checkpoints(tmp_path).entries] == [2, 5, 6]
    assert sorted(p.name for p in tmp_path.glob("step_*.safetensors")) == [
        "step_2.safetensors", "step_5.safetensors", "step_6.safetensors"]


def test_a_diverged_checkpoints_nan_or_infinite_loss_is_never_best(tmp_path):
    store = Checkpoints(tmp_path)
    for step, loss in enumerate([float("nan"), 0.9, float("inf"), 0.5, 0.4, 0.3], start=1):
        store.save(Entry(step, 0, loss), {"w": torch.full((2,), float(step))}, {"step": step}, None,
                   keep_last=1, keep_best=2)
    assert [e.step for e in Checkpoints(tmp_path).best(3)] == [6, 5]
    assert [e.step for e in Checkpoints(tmp_path).entries] == [5, 6]


def test_deepspeed_folders_go_with_their_checkpoint_and_unindexed_ones_are_removed(tmp_path):
    store = Checkpoints(tmp_path)
    for step in (1, 2, 3):
        (tmp_path / f"step_{step}.deepspeed").mkdir()
        (tmp_path / f"step_{step}.deepspeed" / "rank0.pt").write_bytes(b"x")
        if step < 3:  # step 3's save was killed before the index named it
            store.save(Entry(step, 0, None), {"w": torch.zeros(1)}, {}, None, keep_last=1, keep_best=0)
    assert sorted(p.name for p in tmp_path.glob("step_*.deepspeed")) == ["step_2.deepspeed", "step_3.deepspeed"]
    Checkpoints(tmp_path).remove_unindexed_deepspeed_folders()
    assert [p.name for p in tmp_path.glob("step_*.deepspeed")] == ["step_2.deepspeed"]


def test_atomic_write_leaves_the_old_file_and_no_partial_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    atomic_write(target, b"old")

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError):
        atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_schedules_warm_up_linearly_then_follow_their_shape():
    warm = 4
    for name in ("constant", "inverse_sqrt", "cosine"):
        config = SchedulerConfig(name=name, warmup_steps=warm, min_factor=0.1)
        assert [lr_factor(config, s, 20) for s in range(warm)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(SchedulerConfig("constant", warm), 50, 20) == 1.0
    inverse = SchedulerConfig("inverse_sqrt", warm)
    assert lr_factor(inverse, 4 * warm - 1, 0) == pytest.approx(0.5, abs=1e-12)  # sqrt(4 / 16)
    cosine = SchedulerConfig("cosine", warm, min_factor=0.1)
    values = [lr_factor(cosine, s, 20) for s in range(warm, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.1, abs=1e-12)


def test_register_task_and_unknown_names():
    from dataclasses import replace
    register_task(replace(TASK, name="toy_registered"))
    assert get_task("toy_registered").build is TASK.build
    with pytest.raises(CosyError, match="toy_registered"):
        get_task("nope")
    with pytest.raises(CosyError, match="not a cosy.train.task.Task"):
        get_task("toy_task:make_rows")
