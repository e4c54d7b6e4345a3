"""The ``neco_train`` command line. Every :class:`TrainConfig` field is an option (``--lr-head 1e-4``).

    neco_train --data /data/coco --model dinov2_vits14_reg --output runs/neco
    torchrun --nproc_per_node 4 -m neco_train --data /data/coco ...
    neco_train --data DIR --dry-run                 # time a few steps, print the projected epoch time
    neco_train --data DIR --bench voc-incontext,coco-things-linear --bench-data-root /data

User errors (DenseBenchError) print one message with its fix and exit with code 2, without a traceback;
Ctrl-C prints one line with the step reached and the command that continues the run, and exits with 130.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import sys
import textwrap
import typing
from typing import Any

from densebench.errors import ConfigError, DenseBenchError

from .trainer import TrainConfig

HELP = {
    # model
    "model": "base encoder: a densebench registry name, timm:<arch>, random:<arch> or neco:<checkpoint>",
    "weights": "weights file for the base model (timm, Meta or NeCo format), as densebench --weights "
               "(default: the model's own pretrained weights)",
    "model_kwargs": "extra timm.create_model kwargs as JSON, e.g. '{\"depth\": 2}' (default: none)",
    "pos_interp": "position-embedding resampling at other sizes: meta-offset (NeCo's training code) or timm",
    # data and crops
    "data": "training images: COCO (train2017/), an ImageNet-style tree, or any folder of images (required)",
    "output": "run folder: checkpoints, train_state.pt, log.jsonl",
    "epochs": "passes over the training images; the schedules span all of them",
    "batch_size": "images per process per step (the reference: 64 on one GPU)",
    "global_size": "global crop side in pixels, a multiple of the patch size (default: auto, 518 for /14 models, "
                   "224 for /16)",
    "local_size": "local crop side in pixels, a multiple of the patch size",
    "n_local": "local crops per image, besides the 2 global ones",
    "global_scale": "area range of the global crops, as a fraction of the image (RandomResizedCrop scale)",
    "local_scale": "area range of the local crops, as a fraction of the image",
    "min_intersection": "each global crop overlaps the other by more than this fraction of the image area",
    "photometric": "colour jitter, grayscale and blur on the crops (off: geometry only)",
    # the method
    "roi_size": "ROI-Align output side k: k*k query patches and k*k references per crop pair",
    "head_hidden": "hidden width of the projection head MLP",
    "head_out": "output dimension of the projection head (L2-normalised)",
    "head_layers": "linear layers of the projection head",
    "references": "queue (teacher patch FIFO, the released configs) or batch (shuffled aligned teacher patches)",
    "queue_length": "rows of the reference queue per global crop (split over processes with --queue-scope "
                    "process)",
    "queue_per_image": "teacher patches each image pushes into the queue per step",
    "queue_scope": "global: one queue, identical on all processes; process: one per process (the reference)",
    "queue_sampling": "uniform over filled rows, or legacy (randperm(length) %% entries, the reference)",
    "student_steepness": "steepness of the student's differentiable sorting network (larger: harder permutations)",
    "teacher_steepness": "steepness of the teacher's differentiable sorting network",
    "network": "differentiable sorting network: bitonic or odd_even",
    "distribution": "relaxation of the sorting network's swaps: cauchy, logistic, logistic_phi, gaussian, "
                    "reciprocal or optimal",
    "log_floor": "floor P at the smallest float32 inside log (off = the reference's plain log)",
    # optimisation
    "lr_backbone": "AdamW learning rate of the backbone (cosine schedule to --final-lr)",
    "lr_head": "AdamW learning rate of the projection head (cosine schedule to --final-lr)",
    "final_lr": "learning rate at the end of the cosine schedule",
    "warmup_steps": "linear learning-rate warm-up steps (the reference: none)",
    "weight_decay": "weight decay at the start (cosine schedule to --weight-decay-end)",
    "weight_decay_end": "weight decay at the end of the schedule",
    "momentum": "teacher EMA momentum at the start (cosine schedule to --momentum-end)",
    "momentum_end": "teacher EMA momentum at the end of the schedule",
    "drop_path": "stochastic depth rate of the student (the teacher has none)",
    "teacher_head": "independent (the reference): a separate random init; copy: starts as the student's",
    "ema": "teacher update after or before (the reference: the teacher lags one update) the optimizer step",
    "seed": "seed of the crops, the data order, the references, the head initialisation and drop-path",
    # execution
    "device": "auto (CUDA when present), cpu, cuda or cuda:N; under torchrun cuda means the local rank's GPU",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32; sorting and log stay fp32",
    "compile": "torch.compile the student",
    "workers": "data-loading processes per training process",
    "max_steps": "stop after this many steps; the schedules still span all epochs (default: all epochs)",
    "save_every": "also checkpoint every N steps (0: at the end of each epoch and of the run)",
    "log_every": "write the mean loss to log.jsonl (and the terminal, with --progress) every N steps",
    "progress": "a progress bar and the --log-every loss lines on the terminal",
    "resume": "run folder or train_state.pt to continue from (must match this configuration and data) "
              "(default: start a new run)",
    "overwrite": "replace the run already in --output (its checkpoints and log are deleted) instead of refusing",
}

#: Metavars of the string options (numbers show N or X; see build_parser).
METAVAR = {"model": "MODEL", "weights": "FILE", "pos_interp": "MODE", "data": "DIR", "output": "DIR",
           "references": "KIND", "queue_scope": "SCOPE", "queue_sampling": "MODE", "network": "NAME",
           "distribution": "NAME", "teacher_head": "INIT", "ema": "ORDER", "device": "DEVICE",
           "precision": "PRECISION", "resume": "PATH"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, as it is typed ("0.25 1.0", "on"); none where the help text says
    what leaving the option out means (a None, empty or "" default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or "%(default)" in text or action.default in (None, "", [], {}, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"

    def _expand_help(self, action: argparse.Action) -> str:
        default = action.default
        if isinstance(default, bool):
            action = copy.copy(action)
            action.default = "on" if default else "off"
        elif isinstance(default, (tuple, list)):
            action = copy.copy(action)
            action.default = " ".join(map(str, default))
        return super()._expand_help(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # names like meta-offset and --final-lr stay whole on one line
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Interrupted(DenseBenchError):
    """Ctrl-C (SIGINT) during training; the message says where the run stopped and how to continue it."""

    exit_code = 130


def _base_type(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neco_train", description="NeCo post-training of a ViT (densebench).",
                                     formatter_class=HelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base, optional = _base_type(hints[f.name])
        default = getattr(defaults, f.name)
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": HELP.get(f.name, "")}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag, type=float, nargs=2, metavar=("LOW", "HIGH"), **kw)
        elif typing.get_origin(base) is dict or base is dict:
            parser.add_argument(flag, type=_json_object, metavar="JSON", **kw)
        elif optional and base is int:
            parser.add_argument(flag, type=_optional_int, metavar="N", **kw)
        else:
            parser.add_argument(flag, type=base, metavar=METAVAR.get(f.name, {int: "N", float: "X"}.get(base)), **kw)
    parser.add_argument("--dry-run", nargs="?", type=int, const=3, default=None, metavar="STEPS",
                        help="time STEPS steps (3 when no number is given; after one warm-up step), print the "
                             "projected time per epoch, write nothing (default: train)")
    parser.add_argument("--bench", default=None, metavar="NAMES",
                        help="after training, run these densebench benchmarks (comma-separated) on the base and "
                             "the trained model and print a before/after table (default: none)")
    parser.add_argument("--bench-data-root", default=None, metavar="DIR",
                        help="densebench data root (default: $DENSEBENCH_DATA)")
    parser.add_argument("--bench-device", default=None, metavar="DEVICE",
                        help="device for the benchmarks (default: the training one)")
    parser.add_argument("--bench-option", action="append", default=[], metavar="KEY=VALUE",
                        help="protocol option for the benchmarks, e.g. input_size=224; repeatable (default: none)")
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "all", "") else int(text)


def _bench_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--bench-option {item!r} is not KEY=VALUE", hint="e.g. --bench-option input_size=224")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def run_cli(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, train (or dry-run), optionally benchmark; returns a summary (used by tests)."""
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    for name in ("global_scale", "local_scale"):
        values[name] = tuple(values[name])
    cfg = TrainConfig(**values)
    cfg.validate()  # every value is checked before any work
    bench_names = [b.strip() for b in (args.bench or "").split(",") if b.strip()]
    bench_options = _bench_options(args.bench_option)
    if bench_names:  # fail on a bad benchmark name or data root before hours of training
        from .evaluation import check_bench

        check_bench(bench_names, args.bench_data_root)

    from .distributed import init_distributed
    from .trainer import Trainer

    dist = init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, dist, dry_run=args.dry_run is not None)
        if args.dry_run is not None:
            summary = trainer.dry_run(max(1, args.dry_run))
            if dist.is_main:
                _print_dry_run(summary)
            return {"dry_run": summary}
        try:
            summary = trainer.fit()
        except KeyboardInterrupt:
            raise Interrupted(_interrupted(trainer, sys.argv[1:] if argv is None else argv)) from None
        dist.barrier()  # every rank is done training; the benchmarks below run on rank 0 alone
        if dist.is_main:
            print(f"neco_train: {summary['steps']} steps; checkpoint {summary['checkpoint']}", file=sys.stderr)
            if summary["skipped_images"]:
                print(f"neco_train: {summary['skipped_images']} unreadable images were skipped", file=sys.stderr)
        if bench_names and dist.is_main:
            from .evaluation import before_after

            summary["bench"] = before_after(
                trainer.base, trainer.last_checkpoint, bench_names, data_root=args.bench_data_root,
                device=args.bench_device or str(trainer.device), output=trainer.out / "bench",
                options=bench_options, progress=cfg.progress)
        return summary
    finally:
        dist.close()


def _print_dry_run(s: dict[str, Any]) -> None:
    def hms(seconds: float) -> str:
        seconds = round(seconds)
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"

    print(f"dry run on {s['device']}: {s['seconds_per_step']:.3f} s/step over {s['measured_steps']} steps "
          f"(global batch {s['global_batch']}, {s['images_per_s']:.1f} img/s)")
    print(f"projected: {hms(s['seconds_per_epoch'])} per epoch ({s['steps_per_epoch']} steps), "
          f"{hms(s['seconds_total'])} for the whole run")


def _interrupted(trainer: Any, argv: list[str]) -> str:
    """Where an interrupted run stopped, and the exact command that continues it."""
    args, skip = [], False
    for a in argv:  # the same command without --resume/--overwrite, which the continuation sets itself
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not (a.startswith("--resume=") or a in ("--overwrite", "--no-overwrite")):
            args.append(a)
    world, program = trainer.dist.world_size, ["neco_train"]
    if world > 1 and "SLURM_PROCID" in os.environ:
        program = ["srun", "-n", str(world), "neco_train"]
    elif world > 1:
        program = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world)), "-m", "neco_train"]
    if trainer.saved_step is None:
        return (f"interrupted at step {trainer.step} before the first checkpoint; start again with: "
                f"{shlex.join(program + args + ['--overwrite'])}")
    state = trainer.state_path
    resume = str(trainer.out) if state == trainer.out / "train_state.pt" else str(state)
    return (f"interrupted at step {trainer.step}; the last checkpoint is step {trainer.saved_step} "
            f"({trainer.last_checkpoint}); resume with: {shlex.join(program + args + ['--resume', resume])}")


def main(argv: list[str] | None = None) -> None:
    try:
        run_cli(argv)
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"neco_train: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("neco_train: interrupted", file=sys.stderr)
        sys.exit(Interrupted.exit_code)
    except DenseBenchError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"fix: {e.hint}", file=sys.stderr)
        sys.exit(e.exit_code)
