"""`make train-stageN`: run a training stage through the DeepSpeed launcher (or in this process on one CPU).

    python -m training.launch --stage 2 --config configs/train/stage2.yaml --num-gpus 8 [--hostfile hosts]
                              [--set run.steps=1000 ...] [--dry-run]

A sub-stage config (configs/train/stage1.yaml, stage2.yaml, stage3_512.yaml, ...) runs once. A stage plan
(configs/train/stage3.yaml: `substages: [...]`) runs its sub-stages in order, each started from the previous one's
final weights (`init.weights` is set to <previous run.output_dir>/final); `--set` overrides apply to every
sub-stage. Every config is validated, and every sub-stage preflighted (training.preflight: data, feature widths,
resolution, models, init weights), before anything starts; --dry-run stops there.

With --num-gpus > 1, a hostfile, or a GPU, each sub-stage is `deepspeed [--hostfile H] --num_gpus N --module
training.trainer --config ...`: N processes per node (on every node of the hostfile, which DeepSpeed reaches over
pdsh/ssh; the output_dir must then be on a shared filesystem). One process on a CPU-only machine runs in this
process instead (training.trainer.train).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError
from training.train_config import TrainConfig, is_stage_plan, load_stage_plan, load_train_config

log = logging.getLogger("training.launch")


@dataclass
class SubStage:
    config_file: Path
    overrides: list[str]
    config: TrainConfig


def plan_substages(stage: int, config_file: str | Path, overrides: list[str] | None = None) -> list[SubStage]:
    """The sub-stages a launch runs, each validated, with the init chaining of a stage plan applied."""
    overrides = list(overrides or [])
    config_file = Path(config_file)
    if is_stage_plan(config_file):
        plan, files = load_stage_plan(config_file)
        if plan.stage != stage:
            raise ConfigError(f"invalid config {config_file}:\n  stage: the plan is for stage {plan.stage}, "
                              f"launched as stage {stage}")
    else:
        files = [config_file]
    substages: list[SubStage] = []
    for file in files:
        extra = list(overrides)
        if substages:
            # Each sub-stage starts where the previous one ended, whatever its own init.weights says.
            extra.append(f"init.weights={Path(substages[-1].config.run.output_dir) / 'final'}")
        config = load_train_config(file, extra)
        if config.stage != stage:
            raise ConfigError(f"invalid config {file}:\n  stage: the config is for stage {config.stage}, "
                              f"launched as stage {stage} (make train-stage{config.stage})")
        substages.append(SubStage(file, extra, config))
    return substages


def deepspeed_command(sub: SubStage, num_gpus: int, hostfile: str | None = None, master_port: int | None = None) -> list[str]:
    """The DeepSpeed launcher command that runs training.trainer for one sub-stage on every rank."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", str(hostfile)]
    cmd += ["--num_gpus", str(num_gpus)]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    cmd += ["--module", "training.trainer", "--config", str(sub.config_file)]
    for override in sub.overrides:
        cmd += ["--set", override]
    return cmd


def check_substages(substages: list[SubStage], processes: int | None) -> None:
    """Preflight every sub-stage before the first one starts. A chained sub-stage's init.weights does not exist
    yet; it is checked against the model its predecessor will write. A sub-stage that already has checkpoints
    resumes and needs no init weights."""
    from training.preflight import preflight
    from training.trainer import run_history

    for i, sub in enumerate(substages):
        source = substages[i - 1].config.pixart_config() if i else None
        history = run_history(Path(sub.config.run.output_dir))
        checked = preflight(sub.config, world_size=processes or 1, resuming=bool(history), source_config=source)
        for line in checked.checks:
            log.info("preflight %s: %s", sub.config.name, line)


def runs_in_process(num_gpus: int, hostfile: str | None) -> bool:
    """One process, one host and no GPU: no launcher needed."""
    import torch

    return num_gpus <= 1 and not hostfile and not torch.cuda.is_available()


def launch(stage: int, config_file: str | Path, num_gpus: int = 1, hostfile: str | None = None,
           overrides: list[str] | None = None, master_port: int | None = None, dry_run: bool = False) -> int:
    """Run every sub-stage of a stage; returns the first non-zero exit status (0 when all succeeded)."""
    substages = plan_substages(stage, config_file, overrides)
    if hostfile and not Path(hostfile).is_file():
        raise ConfigError(f"--hostfile: {hostfile} not found")
    check_substages(substages, num_gpus if not hostfile else None)
    for i, sub in enumerate(substages, 1):
        log.info("stage %d, sub-stage %d/%d: %s (%s) -> %s", stage, i, len(substages), sub.config.name,
                 sub.config_file, sub.config.run.output_dir)
        if runs_in_process(num_gpus, hostfile):
            if dry_run:
                print(f"[in process] training.trainer.train({sub.config_file} {' '.join(sub.overrides)})")
                continue
            from training.trainer import train

            train(sub.config)
            continue
        cmd = deepspeed_command(sub, max(num_gpus, 1), hostfile, master_port)
        print(shlex.join(cmd), flush=True)
        if dry_run:
            continue
        returncode = subprocess.run(cmd).returncode
        if returncode:
            log.error("sub-stage %s failed with exit status %d", sub.config.name, returncode)
            return returncode
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    parser.add_argument("--config", required=True, help="a sub-stage YAML or a stage plan (configs/train/)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per node (GPUs, or CPU processes)")
    parser.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for multi-node runs")
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field of every sub-stage (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate the configs and print the commands")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from training.trainer import ERRORS

    try:
        return launch(args.stage, args.config, args.num_gpus, args.hostfile, args.set, args.master_port, args.dry_run)
    except ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
