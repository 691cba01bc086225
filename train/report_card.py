"""`slm report RUN [RUN ...]`: report.md, a report card of one run or of a chain of runs (pretraining, then the CPT
and IFT runs that `train.init_from` it), readable on GitHub as is (its PNGs are linked relatively).

The chain is found through the runs' records: each run.dir's config.yaml names its `train.init_from`; a run dir,
a checkpoint folder inside one, an export inside one (run.dir/exports/...) or an export whose marker names its
source checkpoint leads back to the run before it. The first RUN's ancestors come first, then the RUNs given.

Per stage it shows the environment (run.dir/environment.json: git commit, host, device, torch and DeepSpeed
versions), the config and the plan, the tokenizer (vocabulary, bytes per token per source from the data
manifest), the curves (train.report's figure), the downstream table (with any aggregate score the rows carry),
the stability guard's spikes and rollbacks and the skipped steps, checkpoints and exports, the wall-clock time
(and GPU-hours on GPU); and for the last stage a few greedy samples from the final model (`--no-samples` leaves
them out).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from common.atomic import atomic_write_text
from train.checkpoint import checkpoints_dir, complete_checkpoints, has_record, read_record
from train.environment import ENVIRONMENT_FILE
from train.errors import TrainError
from train.handoff.model_card import read_metrics as metric_rows
from train.metrics import METRICS_FILE
from train.plan import PLAN_FILE
from train.profiler import PROFILE_DIR
from train.report import RunMetrics, format_summary, plot, read_metrics, summarize

REPORT_MD = "report.md"
AGGREGATE_KEY = re.compile(r"^centred_score$")
"""The key of the downstream_score rows (train.downstream.component) holding the centred score over the tasks."""
SAMPLE_PROMPTS = ("Once upon a time", "The king said")
CHAT_PROMPTS = ("Give three tips for staying healthy.",)
SAMPLE_TOKENS = 32


@dataclass
class Stage:
    """One run of the chain and what its records say."""

    run_dir: Path
    """The run's folder (run.dir)."""
    config: Dict[str, Any]
    """run.dir/config.yaml as parsed (the latest start's config)."""
    plan: Optional[Dict[str, Any]]
    """run.dir/plan.json (None when absent)."""
    environment: Optional[Dict[str, Any]]
    """run.dir/environment.json (None for runs from before it was written)."""
    metrics: Optional[RunMetrics]
    """train.report's parsed rows (None when the run logged none)."""
    rows: List[Dict[str, Any]] = field(default_factory=list)
    """Every row of metrics.jsonl, in order (spike rows, aggregates)."""

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name

    @property
    def stage(self) -> str:
        return str(self.config.get("train", {}).get("stage", "pretrain"))

    @property
    def init_from(self) -> Optional[str]:
        return self.config.get("train", {}).get("init_from")


def _json_file(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(
            f"'{path}' could not be read as JSON ({err}); expected the file slm train wrote."
        ) from None
    return value if isinstance(value, dict) else None


def load_stage(run_dir: Path) -> Stage:
    """A run's records; TrainError naming the folder when it is no run dir."""
    config_path = run_dir / "config.yaml"
    config: Any = {}
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise TrainError(f"'{config_path}' is not valid YAML ({err}).") from None
    # A run dir without config.yaml still reports its metrics; without both, read_metrics names what is missing.
    metrics = (
        read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() or not config_path.is_file() else None
    )
    return Stage(
        run_dir,
        config if isinstance(config, dict) else {},
        _json_file(run_dir / PLAN_FILE),
        _json_file(run_dir / ENVIRONMENT_FILE),
        metrics,
        metric_rows(run_dir),
    )


def run_dir_of(source: str | os.PathLike) -> Optional[Path]:
    """The run dir a `train.init_from` value came from, or None (a foreign export, a path that is gone)."""
    path = Path(source)
    for candidate in (
        path,
        path.parent,
        path.parent.parent,
    ):  # a run dir, its checkpoints/, a step or export in it
        if (candidate / "config.yaml").is_file() and (candidate / METRICS_FILE).is_file():
            return candidate
    marker = _json_file(path / "slm_export.json") if path.is_dir() else None
    origin = (marker or {}).get("provenance", {}).get("source")
    if origin and Path(origin) != path:
        return run_dir_of(origin)
    return None


def find_chain(run_dirs: Sequence[str | os.PathLike]) -> List[Stage]:
    """The first run's ancestors (through train.init_from), then the runs given, each once."""
    given = [load_stage(Path(d)) for d in run_dirs]
    chain: List[Stage] = []
    seen = {given[0].run_dir.resolve()}
    source = given[0].init_from
    while source:
        parent = run_dir_of(source)
        if parent is None or parent.resolve() in seen:
            break
        seen.add(parent.resolve())
        stage = load_stage(parent)
        chain.insert(0, stage)
        source = stage.init_from
    chain.append(given[0])
    for stage in given[1:]:
        if stage.run_dir.resolve() not in seen:
            seen.add(stage.run_dir.resolve())
            chain.append(stage)
    return chain


# -- the sections of a stage


def _cell(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if spec else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def wall_seconds(stage: Stage) -> Optional[float]:
    """First to last metrics row (every start of the run included)."""
    times = [row["time"] for row in stage.rows if isinstance(row.get("time"), (int, float))]
    return max(times) - min(times) if len(times) > 1 else None


def spike_rows(stage: Stage) -> List[Dict[str, Any]]:
    return [row for row in stage.rows if row.get("kind") == "spike"]


def aggregates(stage: Stage) -> Dict[str, Any]:
    """The latest centred downstream score the run logged (the downstream_score rows), by key."""
    found: Dict[str, Any] = {}
    for row in stage.rows:
        if row.get("kind") in ("train", "eval", "spike"):
            continue
        for key, value in row.items():
            if AGGREGATE_KEY.search(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key] = (row.get("step"), value)
    return found


def latest_record(stage: Stage) -> Any:
    found = complete_checkpoints(checkpoints_dir(stage.run_dir))
    return read_record(found[-1]) if found else None


def summary_row(stage: Stage) -> List[str]:
    summary = summarize(stage.metrics) if stage.metrics else {}
    record = latest_record(stage)
    wall = wall_seconds(stage)
    return [
        stage.stage,
        f"`{stage.name}`",
        _cell(summary.get("steps")),
        _cell(summary.get("tokens_seen"), ",d"),
        _cell(summary.get("final_train_loss"), ".4f"),
        _cell(summary.get("best_val_loss"), ".4f"),
        _cell(summary.get("best_val_bpb"), ".4f"),
        _cell(record.progress.skipped_steps if record else None),
        str(len(spike_rows(stage))),
        _cell(wall, ".0f"),
    ]


def bytes_per_token(config: Dict[str, Any]) -> List[List[str]]:
    """Per source and split: tokens, text bytes and bytes per token from the data manifest."""
    data_dir = config.get("data", {}).get("dir")
    manifest = (
        _json_file(Path(data_dir) / "manifest.json") if data_dir and "://" not in str(data_dir) else None
    )
    totals: Dict[tuple, List[int]] = {}
    for shard in (manifest or {}).get("shards", []):
        key = (shard.get("source"), shard.get("split"))
        entry = totals.setdefault(key, [0, 0])
        entry[0] += int(shard.get("tokens", 0))
        entry[1] += int(shard.get("text_bytes", 0))
    return [
        [str(source), str(split), f"{tokens:,}", f"{text:,}", f"{text / tokens:.3f}" if tokens else "n/a"]
        for (source, split), (tokens, text) in sorted(
            totals.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))
        )
    ]


def downstream_lines(stage: Stage) -> List[str]:
    tasks = stage.metrics.downstream if stage.metrics else {}
    found = aggregates(stage)
    if not tasks and not found:
        return ["No downstream rows (eval.downstream was off for this run)."]
    lines = []
    if tasks:
        rows = []
        for task, task_rows in tasks.items():
            last = task_rows[-1]
            rows.append(
                [
                    task,
                    last["step"],
                    _cell(last.get("acc"), ".4f"),
                    _cell(last.get("acc_norm"), ".4f"),
                    _cell(last.get("examples")),
                ]
            )
        lines += _table(["task", "step", "acc", "acc_norm", "examples"], rows)
    for key, (step, value) in found.items():
        lines.append(f"\nAggregate `{key}` at step {step}: **{value:.4f}**")
    return lines


def guard_lines(stage: Stage) -> List[str]:
    spikes = spike_rows(stage)
    record = latest_record(stage)
    skipped = record.progress.skipped_steps if record else None
    rollbacks = ((record.progress.guard or {}).get("rollbacks", []) if record else []) or []
    lines = [f"Skipped steps (non-finite, or a loss spike under guard.action=skip): {_cell(skipped)}."]
    if spikes:
        lines += [""] + _table(
            ["step", "signal", "value", "baseline", "z", "action"],
            [
                [
                    r["step"],
                    r.get("signal"),
                    _cell(r.get("value"), ".4g"),
                    _cell(r.get("baseline"), ".4g"),
                    _cell(r.get("z"), ".1f"),
                    r.get("action"),
                ]
                for r in spikes
            ],
        )
    else:
        lines.append("No spikes logged.")
    if rollbacks:
        lines.append("")
    for rb in rollbacks:
        lines.append(
            f"- rolled back at step {rb['step']} to step {rb['to_step']} ({rb['signal']}), skipping loader positions "
            f"[{rb['skipped_samples'][0]}, {rb['skipped_samples'][1]})"
        )
    return lines


def checkpoint_lines(stage: Stage) -> List[str]:
    rows = []
    for step_dir in complete_checkpoints(checkpoints_dir(stage.run_dir)):
        record = read_record(step_dir)
        rows.append(
            [
                f"`{step_dir.name}`",
                record.step,
                f"{record.tokens_seen:,}",
                record.zero_stage,
                record.precision,
            ]
        )
    lines = (
        _table(["checkpoint", "step", "tokens", "ZeRO", "precision"], rows)
        if rows
        else ["No complete checkpoint."]
    )
    exports = sorted(
        p.name for p in (stage.run_dir / "exports").glob("*") if (p / "slm_export.json").is_file()
    )
    if exports:
        lines.append("\nExports: " + ", ".join(f"`exports/{name}`" for name in exports))
    return lines


def profile_lines(stage: Stage, out: Path) -> List[str]:
    """Links to the run's profiler traces (profile.steps), relative to the report's folder."""
    traces = sorted((stage.run_dir / PROFILE_DIR).glob("*")) if (stage.run_dir / PROFILE_DIR).is_dir() else []
    return [
        f"- [{p.name}]({Path(os.path.relpath(p, out)).as_posix()})"
        for p in traces
        if not p.name.startswith(".")
    ]


def environment_lines(stage: Stage) -> List[str]:
    env = stage.environment
    if env is None:
        return ["No environment.json (written by slm train since issue 22)."]
    commit = env.get("git_commit")
    commit = (
        f"{commit[:12]}{' (with uncommitted changes)' if env.get('git_dirty') else ''}"
        if commit
        else "unknown"
    )
    return [
        f"- git commit: {commit}",
        f"- host: {env.get('host')}, {env.get('os')}, {env.get('cpu_count')} CPUs",
        f"- device: {env.get('device')} ({env.get('device_name')}), world size {env.get('world_size')}",
        f"- python {env.get('python')}, torch {env.get('torch')}, DeepSpeed {env.get('deepspeed')}"
        + (f", CUDA {env.get('cuda')}" if env.get("cuda") else ""),
    ]


def samples(stage: Stage) -> List[str]:
    """A few greedy continuations (chat answers for an IFT run) from the run's latest checkpoint."""
    import torch

    from data_pipeline.instruct.chat import encode_chat_prompt
    from data_pipeline.tokenizer import EOT, IM_END, load_tokenizer
    from train.handoff.generate import generate_ids
    from train.handoff.init_from import build_model, load_weights, locate_weights

    if not any(has_record(p) for p in complete_checkpoints(checkpoints_dir(stage.run_dir))):
        return ["No checkpoint to sample from."]
    source = locate_weights(stage.run_dir)
    tokenizer = load_tokenizer(source.tokenizer_path)
    state_dict, cfg = load_weights(source)
    model = build_model(state_dict, cfg, torch.float32)
    chat = stage.stage == "ift"
    lines = [f"Greedy, {SAMPLE_TOKENS} new tokens at most, from `{source.path.name}`:", ""]
    for prompt in CHAT_PROMPTS if chat else SAMPLE_PROMPTS:
        if chat:
            ids = encode_chat_prompt([{"role": "user", "content": prompt}], tokenizer)
        else:
            ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        stop = tokenizer.token_to_id(IM_END if chat else EOT)
        new = generate_ids(model, ids, min(SAMPLE_TOKENS, cfg.max_seq_len), 0.0, None, stop, seed=0)
        text = tokenizer.decode(new, skip_special_tokens=True)
        lines += ["```text", f"{prompt}{' -> ' if chat else ''}{text}".replace("```", "'''"), "```"]
    return lines


def stage_section(number: int, stage: Stage, png: Optional[str], with_samples: bool, out: Path) -> List[str]:
    lines = [f"## {number}. {stage.stage}: `{stage.name}`", ""]
    if stage.init_from:
        lines += [f"Starts from `{stage.init_from}` (train.init_from).", ""]
    lines += ["### Environment", "", *environment_lines(stage), ""]
    plan = stage.plan or {}
    if plan:
        lines += ["### Plan", ""] + _table(["", ""], [[f"`{k}`", v] for k, v in plan.items()]) + [""]
    lines += [
        "### Config",
        "",
        "<details><summary>run.dir/config.yaml</summary>",
        "",
        "```yaml",
        yaml.safe_dump(stage.config, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
        "",
        "### Tokenizer and data",
        "",
        f"Vocabulary: {_cell(plan.get('vocab_size'), ',')} tokens.",
        "",
    ]
    per_source = bytes_per_token(stage.config)
    if per_source and stage.stage != "ift":
        lines += _table(["source", "split", "tokens", "text bytes", "bytes/token"], per_source) + [""]
    if png:
        lines += ["### Curves", "", f"![curves of {stage.name}]({png})", ""]
    lines += ["### Downstream", "", *downstream_lines(stage), ""]
    lines += ["### Spikes and skips", "", *guard_lines(stage), ""]
    lines += ["### Checkpoints and exports", "", *checkpoint_lines(stage), ""]
    wall = wall_seconds(stage)
    env = stage.environment or {}
    time_line = f"Wall-clock: {_cell(wall, ',.0f')} s (first to last metrics row)"
    if wall is not None and env.get("device") == "cuda":
        time_line += f", {wall * int(env.get('world_size') or 1) / 3600:.2f} GPU-hours"
    lines += ["### Time", "", time_line + ".", ""]
    traces = profile_lines(stage, out)
    if traces:
        lines += [
            "### Profile",
            "",
            "Torch profiler traces (open in chrome://tracing or Perfetto):",
            "",
            *traces,
            "",
        ]
    if with_samples:
        lines += ["### Samples", "", *samples(stage), ""]
    return lines


def write_report_card(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: Optional[str | os.PathLike] = None,
    with_samples: bool = True,
) -> Path:
    """report.md (and a PNG of curves per stage) in `out_dir` (default: the last run's dir); returns its path."""
    chain = find_chain(run_dirs)
    out = Path(out_dir) if out_dir is not None else chain[-1].run_dir
    out.mkdir(parents=True, exist_ok=True)
    title = " -> ".join(f"{s.stage} `{s.name}`" for s in chain)
    lines = [f"# Report card: {title}", ""]
    lines += _table(
        [
            "stage",
            "run",
            "steps",
            "tokens",
            "final train loss",
            "best val loss",
            "best val bpb",
            "skipped",
            "spikes",
            "wall s",
        ],
        [summary_row(stage) for stage in chain],
    )
    lines += ["", "## Downstream by stage", ""]
    for stage in chain:
        lines += [f"**{stage.stage}** `{stage.name}`", "", *downstream_lines(stage), ""]
    for number, stage in enumerate(chain, start=1):
        png = None
        if stage.metrics is not None:
            name = "report.png" if len(chain) == 1 else f"report-{number}-{stage.stage}.png"
            plot(stage.metrics, out / name, title=f"{stage.stage}: {stage.name}")
            png = name
        lines += stage_section(
            number, stage, png, with_samples and number == len(chain), out
        )  # the final model
    path = out / REPORT_MD
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def report_cli(run_dirs: Sequence[str], out_dir: Optional[str] = None, with_samples: bool = True) -> int:
    """`slm report`: each run's summary on stdout, then report.md's path."""
    for run_dir in run_dirs:
        print(f"run {run_dir}\n{format_summary(summarize(read_metrics(run_dir)))}")
    path = write_report_card(run_dirs, out_dir, with_samples)
    print(f"report {path}")
    return 0
