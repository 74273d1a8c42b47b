"""`cosy train`: train any cosy model from an experiment YAML (also under torchrun)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (task, model, data, train)")
    parser.add_argument("--train-data", required=True, help="list file of training shards")
    parser.add_argument("--cv-data", required=True, help="list file of validation shards")
    parser.add_argument("--out", required=True, help="experiment directory")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.max_steps=1000")


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from cosy.train.trainer import Trainer, load_experiment

    config, task = load_experiment(args.config, args.overrides)
    try:
        Trainer(config, task, args.train_data, args.cv_data, args.out, resume=args.resume).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
