"""The one training loop of cosy: every model trains through `Trainer`.

Runs as one process or under `torchrun` (DDP: gloo on CPU, NCCL on CUDA), or, with
`train.deepspeed`, through a DeepSpeed engine with ZeRO. A step is one optimiser update
made of `accum_grad` batches; checkpoints are taken only between steps, so the data
position (epoch, batches consumed) plus the RNG states are enough to continue a run
exactly where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cosy import config as cfg
from cosy.data.loader import BatchInfo, DataConfig, ShardDataset, make_loader
from cosy.errors import CosyError
from cosy.checkpoint import load_weights, read_weights
from cosy.train.checkpoint import Checkpoints, Entry, atomic_write, rng_state, set_rng_state
from cosy.train.schedule import OptimConfig, SchedulerConfig, build_optimizer, build_scheduler
from cosy.train.task import Task
from cosy.train.tasks import get_task, known_tasks

log = logging.getLogger("cosy.train")

# DeepSpeed config keys that cosy sets from `train:` (or that would replace its optimiser)
_DEEPSPEED_DERIVED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                      "gradient_clipping", "fp16", "bf16", "torch_autocast", "optimizer", "scheduler"}


@dataclass
class DeepSpeedConfig:
    """`train.deepspeed`: train through a DeepSpeed engine instead of DDP (pip install deepspeed).

    `zero_stage`: 1 partitions the optimiser state over the ranks, 2 the gradients too; the
    weights stay whole on every rank (without ZeRO, leave `deepspeed` out: that is DDP).
    cosy derives the engine's config (accumulation, clipping, ZeRO stage, bf16 as the
    engine's own autocast) from `train:`; `config` adds further DeepSpeed keys (e.g.
    `{zero_optimization: {overlap_comm: true}}`), but none that cosy derives. Each
    checkpoint keeps the ranks' optimiser partitions in `step_<N>.deepspeed/`. An epoch's
    last, incomplete accumulation is stepped (its loss still divided by `accum_grad`)
    rather than dropped: ZeRO 2 has already reduced its gradients.
    """

    zero_stage: int = 2
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The `train:` section of an experiment config.

    A step is one optimiser update over `accum_grad` batches. Training stops at
    `max_steps` or after `max_epochs` (0 = no limit on that count). Validation runs
    every `cv_every_steps` steps (0 = never mid-epoch), at the end of each epoch when
    `cv_every_epoch`, and at the end of training; each validation is followed by a
    checkpoint. `save_every_steps` and epoch ends without validation add checkpoints
    without a validation loss. The last `keep_last` and the best `keep_best` (by validation
    loss) checkpoints are kept. `optim_d` is the discriminator's optimiser of a GAN
    task (None = the same settings as `optim`). `ema_decay` > 0 keeps an exponential
    moving average of the weights. `gan_warmup_steps`: a GAN task's first N steps train
    the generator alone on its reconstruction losses (`turn="warmup"`); the discriminator,
    which costs most of a step, is neither run nor stepped until then. `init`: weights
    (`.safetensors` of the same model, e.g. another run's `model.safetensors`) that a new
    run starts from, to fine-tune with changed settings; the optimiser, schedule and step
    count start afresh. `--resume` of a run that has checkpoints ignores it.
    """

    optim: OptimConfig = field(default_factory=OptimConfig)
    optim_d: OptimConfig | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_steps: int = 0
    max_epochs: int = 1
    accum_grad: int = 1
    grad_clip: float = 5.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    ema_decay: float = 0.0
    gan_warmup_steps: int = 0
    log_every: int = 10
    cv_every_steps: int = 0
    cv_every_epoch: bool = True
    save_every_steps: int = 0
    keep_last: int = 3
    keep_best: int = 5
    seed: int = 1234
    find_unused_parameters: bool = False
    init: str | None = None
    deepspeed: DeepSpeedConfig | None = None


@dataclass
class ExperimentConfig:
    """A whole experiment; `model` is an instance of the task's `config_cls`."""

    task: str
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> tuple[ExperimentConfig, Task]:
    """Read an experiment YAML; the `model:` section is checked against the task's dataclass."""
    data = cfg.apply_overrides(cfg.load_yaml(path), overrides or [])
    name = data.get("task")
    if not isinstance(name, str):
        raise CosyError(f"{path}: config needs a 'task' key naming one of: {', '.join(known_tasks())}")
    try:
        task = get_task(name)
        model = cfg.from_dict(task.config_cls, data.get("model"), "model")
        experiment = cfg.from_dict(ExperimentConfig, {**data, "model": None})
    except CosyError as err:
        raise CosyError(f"{path}: {err}") from err
    experiment.model = model
    return experiment, task


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the process group that torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(_backend(device))
    return Distributed(rank, world_size, device)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class Trainer:
    """Trains `task`'s model on the shards of `train_list`, validating on `cv_list`."""

    def __init__(self, config: ExperimentConfig, task: Task, train_list: str | Path, cv_list: str | Path,
                 expdir: str | Path, resume: bool = False):
        self.config = config
        self.task = task
        self.dist = init_distributed()
        self.expdir = Path(expdir)
        t = config.train
        self._check(t)
        self.expdir.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            _setup_logging(self.expdir / "train.log")
            for stale in self.expdir.glob(".*.tmp"):  # left by a process killed mid-write
                stale.unlink()
            if t.precision == "bf16" and self.dist.device.type == "cpu" and not cpu_has_bf16():
                log.warning("train.precision=bf16 on a CPU without AVX512-BF16 or AMX: its bf16 matrix "
                            "products are emulated, which is usually slower than fp32")
        self.checkpoints = Checkpoints(self.expdir)
        if self.dist.main:
            self.checkpoints.remove_unindexed_deepspeed_folders()
        if self.checkpoints.entries and not resume:
            raise CosyError(f"--out {self.expdir} already holds checkpoints: pass --resume or choose a new --out")

        rank, world = self.dist.rank, self.dist.world_size
        self.train_set = ShardDataset(train_list, task, config.model, config.data, True, rank, world)
        self.cv_set = ShardDataset(cv_list, task, config.model, config.data, False, rank, world)

        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = task.build(config.model)
        if t.init and not (resume and self.checkpoints.entries):
            load_weights(self.model, read_weights(t.init), t.init, "the config's model: section", task.training_only)
            log.info("initialised from %s", t.init)
        self.model = self.model.to(self.dist.device)
        parts = ("generator", "discriminator")
        if task.gan and not all(isinstance(getattr(self.model, n, None), nn.Module) for n in parts):
            raise CosyError(f"task '{task.name}' is a GAN task but its model lacks a generator or "
                            "discriminator submodule")
        groups = ({"discriminator": self.model.discriminator, "generator": self.model.generator}
                  if task.gan else {"model": self.model})
        optims = {"discriminator": t.optim_d or t.optim}
        self.params = {name: [p for p in m.parameters() if p.requires_grad] for name, m in groups.items()}
        self.optimizers = {name: build_optimizer(ps, optims.get(name, t.optim)) for name, ps in self.params.items()}
        self.schedulers = {name: build_scheduler(o, t.scheduler, t.max_steps) for name, o in self.optimizers.items()}
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=t.precision == "fp16")
        self.ema = self._fresh_ema() if t.ema_decay > 0 else None
        self.forward_module: nn.Module = self.model
        self.engine = None
        if t.deepspeed is not None:
            self.engine = self.forward_module = self._deepspeed_engine(t)
        elif world > 1 and not task.gan:
            self.forward_module = DistributedDataParallel(
                self.model, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                find_unused_parameters=t.find_unused_parameters)
        elif world > 1:
            for value in self.model.state_dict().values():
                dist.broadcast(value, 0)

        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch already trained on
        self.saved: tuple[int, float | None] = (-1, None)  # (step, cv loss): known on every rank, unlike the index
        self.last_lr: dict[str, float] = {}  # each optimiser's rate in the last step
        torch.manual_seed(t.seed + rank)  # but different dropout masks per rank
        if resume:
            self._restore()
        self.writer = None
        if self.dist.main:
            atomic_write(self.expdir / "config.yaml", cfg.dumps(config).encode())
            from torch.utils.tensorboard import SummaryWriter
            # a resumed run logs again the steps after its checkpoint: their old events are dropped
            self.writer = SummaryWriter(str(self.expdir / "tensorboard"), purge_step=self.step + 1 if self.step else None)

    def _check(self, t: TrainConfig) -> None:
        if t.max_steps <= 0 and t.max_epochs <= 0:
            raise CosyError("set train.max_steps or train.max_epochs: with both 0 training never stops")
        for key in ("accum_grad", "log_every"):
            if getattr(t, key) < 1:
                raise CosyError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        for key in ("max_steps", "max_epochs", "cv_every_steps", "save_every_steps", "gan_warmup_steps"):
            if getattr(t, key) < 0:
                raise CosyError(f"train.{key} must be >= 0, got {getattr(t, key)}")
        if not 0 <= t.ema_decay < 1:
            raise CosyError(f"train.ema_decay must be in [0, 1) (0 = no EMA), got {t.ema_decay}")
        if self.task.gan and t.accum_grad != 1:
            raise CosyError("train.accum_grad must be 1 for a GAN task "
                            "(each step is a discriminator and a generator turn)")
        if t.precision == "fp16" and self.dist.device.type != "cuda":
            raise CosyError("train.precision=fp16 needs a CUDA device; use bf16 on CPU")
        if t.deepspeed is not None:
            if self.task.gan:
                raise CosyError("train.deepspeed does not train GAN tasks (two optimisers taking turns); "
                                "remove it for this task")
            if t.precision == "fp16":
                raise CosyError("train.deepspeed with train.precision=fp16 is not supported: use bf16")
            if t.deepspeed.zero_stage not in (1, 2):
                raise CosyError(f"train.deepspeed.zero_stage must be 1 or 2, got {t.deepspeed.zero_stage} "
                                "(ZeRO 3, which partitions the weights, is not supported)")
            extra = t.deepspeed.config
            derived = sorted(set(extra) & _DEEPSPEED_DERIVED)
            if "stage" in (extra.get("zero_optimization") or {}):
                derived.append("zero_optimization.stage")
            if derived:
                raise CosyError(f"train.deepspeed.config sets {', '.join(derived)}, which cosy derives from train: "
                                "(accum_grad, grad_clip, precision, optim, scheduler, deepspeed.zero_stage)")

    def _deepspeed_engine(self, t: TrainConfig) -> nn.Module:
        """A DeepSpeed engine around the model and its optimiser; the schedule stays cosy's."""
        try:
            import deepspeed
            from packaging.version import Version
        except ImportError as err:
            raise CosyError("train.deepspeed needs the deepspeed package: pip install 'deepspeed>=0.17.2'") from err
        if Version(deepspeed.__version__) < Version("0.17.2"):  # older ones ignore the torch_autocast section
            raise CosyError(f"train.deepspeed needs deepspeed >= 0.17.2, found {deepspeed.__version__}")
        if not dist.is_initialized():  # one process without torchrun: DeepSpeed still wants a group
            dist.init_process_group(_backend(self.dist.device), store=dist.HashStore(), rank=0, world_size=1)
            for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(name, value)
        config = {
            # cosy's loader batches by frames; DeepSpeed only books this number
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": t.accum_grad,
            "gradient_clipping": max(t.grad_clip, 0.0),
            "zero_optimization": {"stage": t.deepspeed.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        if t.precision == "bf16":
            # the engine's forward switches off (on CUDA) an autocast it was not configured
            # with; no "lower precision safe" modules keeps the gradient reduction in fp32
            config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        engine, *_ = deepspeed.initialize(model=self.model, optimizer=self.optimizers["model"],
                                          config=_merged(config, t.deepspeed.config))
        return engine

    # ---- the loop ----------------------------------------------------------------

    def fit(self) -> None:
        """Train until max_steps or max_epochs; the last state is always checkpointed."""
        self.model.train()
        bar = self._progress_bar()
        while not self._finished():
            whole_epoch, steps_before = self.batches_done == 0, self.step
            stopped = self._train_epoch(bar)
            if stopped:
                break
            if self.batches_done == 0:
                raise CosyError(f"no training batches in {self.train_set.list_path}: the shards are empty or every "
                                "row was dropped by the task's processors")
            if whole_epoch and self.step == steps_before:  # else it would loop over epochs without learning
                raise CosyError(f"an epoch of {self.train_set.list_path} has {self.batches_done} batches on this "
                                f"process, fewer than train.accum_grad={self.config.train.accum_grad}: no step "
                                "is ever taken; lower accum_grad or the batch size")
            log.info("epoch %d done at step %d", self.epoch, self.step)
            self.epoch += 1
            self.batches_done = 0
            if self._finished():
                break
            if self.config.train.cv_every_epoch and not self._validated_now():
                self._validate_and_save()
            else:  # saved again even at a step just saved, so that a resume starts the next epoch afresh
                self._save(self.saved[1] if self.saved[0] == self.step else None)
        if not self._validated_now():
            self._validate_and_save()
        if bar is not None:
            bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.dist.world_size > 1:
            dist.barrier()

    def _validated_now(self) -> bool:
        return self.saved[0] == self.step and self.saved[1] is not None

    def _finished(self) -> bool:
        t = self.config.train
        return (t.max_steps > 0 and self.step >= t.max_steps) or (t.max_epochs > 0 and self.epoch >= t.max_epochs)

    def _train_epoch(self, bar) -> bool:
        """Train on the rest of the current epoch; True when max_steps stopped it early."""
        t = self.config.train
        stats = _Stats()
        micro = 0
        for batch, info, final in self._synced(make_loader(self.train_set, self.epoch, skip=self.batches_done)):
            micro += 1
            self.batches_done += 1
            last = micro % t.accum_grad == 0 or final  # final: known under DeepSpeed only
            if self.task.gan:
                losses, norms = self._gan_step(batch)
            else:
                losses = self._backward(batch, sync=last)
                norms = {"grad_norm": self._update("model")} if last else {}
                if last:
                    self.scaler.update()
            stats.add(losses, info)
            if not last:
                continue
            self.step += 1
            self._update_ema()
            stats.norms = norms
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(losses['generator/loss' if self.task.gan else 'loss']):.4f}")
            if self.step % t.log_every == 0:
                self._log_train(stats)
                stats = _Stats()
            if t.cv_every_steps and self.step % t.cv_every_steps == 0:
                self._validate_and_save()
            elif t.save_every_steps and self.step % t.save_every_steps == 0:
                self._save(None)
            if self._finished():
                return True
        for optimizer in self.optimizers.values():  # an incomplete accumulation is dropped
            optimizer.zero_grad(set_to_none=True)
        return False

    def _synced(self, batches: Iterator[tuple[dict, BatchInfo]]) -> Iterator[tuple[dict, BatchInfo, bool]]:
        """(batch on the device, info, whether it is the epoch's last: known under DeepSpeed
        alone, else False), ending on every rank as soon as one rank runs out.

        Ranks can hold different numbers of batches (shards of different sizes); DDP
        would hang if one rank stopped while the others waited for its gradients. Only
        DeepSpeed needs to know the last batch, which takes a one-batch lookahead.
        """
        pending = None
        for item in _with_end(batches):
            ended = item is None
            if self.dist.world_size > 1:
                flag = torch.tensor([0 if ended else 1], device=self.dist.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                ended = not flag.item()
            if pending is not None:
                yield (*pending, ended)
                pending = None
            if ended:
                return
            batch, info = item
            if self.engine is None:
                yield _to_device(batch, self.dist.device), info, False
            else:
                pending = _to_device(batch, self.dist.device), info

    def _autocast(self):
        precision = self.config.train.precision
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _backward(self, batch: dict, sync: bool) -> dict[str, torch.Tensor]:
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(sync)
            losses = self.engine(batch)  # under the engine's own autocast when bf16
            self.engine.backward(losses["loss"])  # divides by accum_grad itself
            return {k: v.detach() for k, v in losses.items()}
        module = self.forward_module
        no_sync = module.no_sync() if isinstance(module, DistributedDataParallel) and not sync else nullcontext()
        with no_sync:
            with self._autocast():
                losses = module(batch)
            self.scaler.scale(losses["loss"] / self.config.train.accum_grad).backward()
        return {k: v.detach() for k, v in losses.items()}

    def _gan_step(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Discriminator turn then generator turn on the same batch dict (see docs/design.md);
        the generator's warmup turn alone during the first `gan_warmup_steps` steps."""
        logged, norms = {}, {}
        warmup = self.step < self.config.train.gan_warmup_steps
        for turn, optimizer in ([("warmup", "generator")] if warmup else
                                [("discriminator", "discriminator"), ("generator", "generator")]):
            self.optimizers[optimizer].zero_grad(set_to_none=True)
            with self._autocast():
                losses = self.model(batch, turn=turn)
            self.scaler.scale(losses["loss"]).backward()
            if self.dist.world_size > 1:
                _average_gradients(self.params[optimizer], self.dist.world_size)
            norms[f"grad_norm_{optimizer}"] = self._update(optimizer)
            logged.update({f"{optimizer}/{k}": v.detach() for k, v in losses.items()})
        self.scaler.update()
        return logged, norms

    def _update(self, name: str) -> float:
        """Clip, step and advance the schedule of optimiser `name`; returns the gradient norm."""
        if self.engine is not None:
            self.engine.step()  # clips and steps ZeRO's partitions
            self.last_lr[name] = self.optimizers[name].param_groups[0]["lr"]
            self.schedulers[name].step()
            norm = self.engine.get_global_grad_norm()
            return math.nan if norm is None else float(norm)
        optimizer = self.optimizers[name]
        self.scaler.unscale_(optimizer)
        clip = self.config.train.grad_clip
        norm = float(torch.nn.utils.clip_grad_norm_(self.params[name], clip if clip > 0 else math.inf))
        if math.isfinite(norm) or self.scaler.is_enabled():
            self.scaler.step(optimizer)  # the fp16 scaler itself skips non-finite steps
        else:
            log.warning("step %d: non-finite gradient norm for %s, update skipped", self.step + 1, name)
        optimizer.zero_grad(set_to_none=True)
        self.last_lr[name] = optimizer.param_groups[0]["lr"]
        self.schedulers[name].step()
        return norm

    def _fresh_ema(self) -> dict[str, torch.Tensor]:
        """An EMA that starts at the current weights (float tensors only: counters are not averaged)."""
        return {k: v.detach().float().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.config.train.ema_decay
        for key, value in self.model.state_dict().items():
            if key in self.ema:
                self.ema[key].lerp_(value.float(), 1 - decay)

    # ---- validation, logging, checkpoints ----------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss terms over the validation set (weighted by rows), from all ranks.

        The RNG states are restored afterwards, so how often validation runs never
        changes the training trajectory.
        """
        saved = rng_state()
        self.model.eval()
        sums: dict[str, float] = {}
        rows = 0
        kwargs = {"turn": "generator"} if self.task.gan else {}
        for batch, info in make_loader(self.cv_set, 0):
            with self._autocast():
                losses = self.model(_to_device(batch, self.dist.device), **kwargs)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value) * info.rows
            rows += info.rows
        self.model.train()
        set_rng_state(saved)
        if self.dist.world_size > 1:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, (sums, rows))
            sums, rows = {}, 0
            for part_sums, part_rows in gathered:
                rows += part_rows
                for key, value in part_sums.items():
                    sums[key] = sums.get(key, 0.0) + value
        if rows == 0:
            raise CosyError(f"no validation batches in {self.cv_set.list_path}: the shards are empty "
                            "or every row was dropped by the task's processors")
        return {key: value / rows for key, value in sums.items()}

    def _validate_and_save(self) -> None:
        cv = self.validate()
        if self.dist.main:
            log.info("step %d cv %s", self.step, _format(cv))
            for key, value in cv.items():
                self.writer.add_scalar(f"cv/{key}", value, self.step)
        self._save(cv["loss"])

    def _save(self, cv_loss: float | None) -> None:
        rngs: list[Any] = [rng_state()]
        if self.dist.world_size > 1:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng_state())
        entry = Entry(self.step, self.epoch, cv_loss)
        # every rank writes its partition before the index names the step; a step saved again
        # (validation after a periodic save) keeps its files, as its optimiser state is the same
        if self.engine is not None and self.saved[0] != self.step:
            self.engine.save_checkpoint(str(self.expdir), tag=entry.deepspeed, client_state={}, save_latest=False)
        if self.dist.main:
            t = self.config.train
            state = {
                "step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "optimizers": ({} if self.engine is not None  # in step_<N>.deepspeed/
                               else {k: o.state_dict() for k, o in self.optimizers.items()}),
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict(), "ema": self.ema, "rng": rngs,
                "data_parts": self.dist.world_size * max(1, self.config.data.num_workers),
            }
            weights = self.model.state_dict()
            # the EMA file is a whole state_dict, so it loads like the weights (BatchNorm counters included)
            ema = None if self.ema is None else {k: self.ema.get(k, v) for k, v in weights.items()}
            self.checkpoints.save(entry, weights, state, ema, t.keep_last, t.keep_best)
            log.info("saved %s", self.expdir / entry.weights)
        self.saved = (self.step, cv_loss)
        if self.dist.world_size > 1:
            dist.barrier()

    def _restore(self) -> None:
        entry = self.checkpoints.latest()
        if entry is None:
            log.warning("--resume: no checkpoint in %s yet, starting from scratch", self.expdir)
            return
        self.model.load_state_dict(read_weights(self.expdir / entry.weights))
        state = self.checkpoints.load_state(entry)
        partitioned = (self.expdir / entry.deepspeed).is_dir()
        if partitioned != (self.engine is not None):
            raise CosyError(f"--resume: {self.expdir / entry.state} was written "
                            f"{'with' if partitioned else 'without'} train.deepspeed; resume it the same way")
        if self.engine is not None:
            if len(state["rng"]) != self.dist.world_size:
                raise CosyError(f"--resume: the ZeRO partitions in {self.expdir / entry.deepspeed} were written by "
                                f"{len(state['rng'])} processes; resume with as many")
            loaded, _ = self.engine.load_checkpoint(str(self.expdir), tag=entry.deepspeed, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
            if loaded is None:
                raise CosyError(f"--resume: DeepSpeed could not load {self.expdir / entry.deepspeed}")
        else:
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # a run that turns EMA on at its resume starts it at the restored weights
            self.ema = ({k: v.to(self.dist.device) for k, v in state["ema"].items()} if state["ema"] is not None
                        else self._fresh_ema())
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.saved = (self.step, entry.cv_loss)
        if len(state["rng"]) == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank])
        else:
            log.warning("resuming with %d processes instead of %d: RNG states are not restored",
                        self.dist.world_size, len(state["rng"]))
        parts = self.dist.world_size * max(1, self.config.data.num_workers)
        if self.batches_done and state.get("data_parts", parts) != parts:
            log.warning("resuming in the middle of epoch %d with %d data parts (processes x loader workers) "
                        "instead of %d: the epoch's batches come in another order, so the rest of it repeats "
                        "some utterances and leaves out others", self.epoch, parts, state["data_parts"])
        log.info("resumed from %s (step %d, epoch %d, batch %d)",
                 self.expdir / entry.weights, self.step, self.epoch, self.batches_done)

    def _log_train(self, stats: _Stats) -> None:
        if not self.dist.main:
            return
        values = stats.mean()
        values.update(stats.norms)
        values["lr"] = self.last_lr.get("generator", self.last_lr.get("model", math.nan))
        if "discriminator" in self.last_lr:
            values["lr_discriminator"] = self.last_lr["discriminator"]
        values["frames_per_s"] = stats.frames_per_second()
        log.info("epoch %d step %d %s", self.epoch, self.step, _format(values))
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, self.step)

    def _progress_bar(self):
        if not (self.dist.main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.config.train.max_steps or None, initial=self.step, unit="step")


class _Stats:
    """Running sums of loss terms and frames since the last log line.

    Loss terms stay tensors until they are logged: reading each one would wait for the
    GPU after every batch.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.frames = 0
        self.start = time.perf_counter()
        self.norms: dict[str, float] = {}

    def add(self, losses: dict[str, torch.Tensor], info: BatchInfo) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums[key] + value.float() if key in self.sums else value.float()
        self.count += 1
        self.frames += info.frames

    def mean(self) -> dict[str, float]:
        return {key: float(value) / max(1, self.count) for key, value in self.sums.items()}

    def frames_per_second(self) -> float:
        """Frames of this process per second of wall time."""
        return self.frames / max(1e-9, time.perf_counter() - self.start)


def _merged(base: dict, extra: dict) -> dict:
    """`base` with `extra`'s keys put over it, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_end(items: Iterator[Any]) -> Iterator[Any]:
    yield from items
    yield None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks in one all-reduce.

    GAN turns each touch one submodule, which DDP's single reducer cannot follow.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.5g}" for k, v in values.items())


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    # private probes of torch.cpu: absent in some builds, where the answer is "no"
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def _setup_logging(path: Path) -> None:
    logger = logging.getLogger("cosy")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        if getattr(handler, "cosy_train", False):
            logger.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(path), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(formatter)
        handler.cosy_train = True
        logger.addHandler(handler)
