"""`slm eval MODEL --tasks hellaswag,arc_easy,...`: downstream accuracy of a run dir, checkpoint or export.

Runs as one process or under torchrun (each rank scores its share of the examples; gloo on CPU, nccl on GPU).
Rank 0 prints a table (task, metric, value, stderr, examples) with examples/s in its footer and, with
--output, writes the metrics and every example's per-choice log-likelihoods as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as torch_dist

from common.atomic import atomic_write_text
from common.log import say
from data_pipeline.tokenizer import load_tokenizer
from train.checkpoint.layout import looks_like_checkpoint
from train.downstream.evaluate import DownstreamResult, TaskRequests, build_task_requests, score_tasks, world
from train.downstream.fetch import fetch_eval_data
from train.downstream.metrics import CentredScore
from train.errors import TrainError
from train.handoff.init_from import build_model, load_weights, locate_weights

EVAL_OUTPUT_KEYS = (
    "model",
    "settings",
    "tasks",
    "centred_score",
    "seconds",
    "examples_per_second",
    "examples",
)
"""The top-level keys of `slm eval --output` JSON (how an earlier result is recognised before replacing it)."""
OLDER_EVAL_OUTPUT_KEYS = tuple(key for key in EVAL_OUTPUT_KEYS if key != "centred_score")
"""The keys of a result written before the centred score, recognised the same way."""


def init_process_group(device: str) -> torch.device:
    """Join torchrun's process group when launched by it; the device this rank computes on."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda but no CUDA GPU is visible; use --device cpu or auto.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")


def format_table(
    result: DownstreamResult,
    task_requests: List[TaskRequests],
    processes: int,
    device: torch.device,
    shots: int,
) -> str:
    lines = [f"{'task':<16}{'metric':<12}{'value':>10}{'stderr':>10}{'examples':>10}  split", "-" * 66]
    for tr in task_requests:
        metrics = result.metrics[tr.task.name]
        for name in [m for m in metrics if not m.endswith("_stderr") and m != "examples"]:
            stderr = metrics.get(f"{name}_stderr")
            stderr_text = f"{stderr:.4f}" if stderr is not None else "-"
            lines.append(
                f"{tr.task.name:<16}{name:<12}{metrics[name]:>10.4f}{stderr_text:>10}"
                f"{metrics['examples']:>10}  {tr.split}"
            )
    lines.append("-" * 66)
    lines.append(format_centred(result.centred))
    lines.append(
        f"{len(result.examples)} examples in {result.seconds:.1f} s: {result.examples_per_second:.1f} "
        f"examples/s ({processes} process(es), {device.type}, {shots}-shot)"
    )
    return "\n".join(lines)


def format_centred(centred: CentredScore) -> str:
    """The table's score line: the mean and each task's centred accuracy (which metric, what chance)."""
    parts = ", ".join(
        f"{name} {t.metric} {t.accuracy:.4f} vs chance {t.chance:.4f} -> {t.centred:+.4f}"
        for name, t in centred.tasks.items()
    )
    return f"centred score {centred.score:+.4f} = mean of ({parts})"


def centred_json(centred: CentredScore) -> Dict[str, Any]:
    """The score and its parts, as `slm eval --output` writes them."""
    return {
        "score": centred.score,
        "tasks": {
            name: {"metric": t.metric, "accuracy": t.accuracy, "chance": t.chance, "centred": t.centred}
            for name, t in centred.tasks.items()
        },
    }


def result_json(
    model: str, result: DownstreamResult, task_requests: List[TaskRequests], settings: Dict[str, Any]
) -> str:
    tasks = {
        tr.task.name: {
            **result.metrics[tr.task.name],
            "split": tr.split,
            "source": tr.source,
            "harness_task": tr.task.harness_task,
        }
        for tr in task_requests
    }
    examples = [
        {
            "task": r.task,
            "index": r.index,
            "loglikelihoods": r.loglikelihoods,
            "greedy": r.greedy,
            "gold": r.gold,
            "choice_lengths": r.choice_lengths,
        }
        for r in result.examples
    ]
    payload = {  # the keys are EVAL_OUTPUT_KEYS
        "model": model,
        "settings": settings,
        "tasks": tasks,
        "centred_score": centred_json(result.centred),
        "seconds": result.seconds,
        "examples_per_second": result.examples_per_second,
        "examples": examples,
    }
    return json.dumps(payload, indent=1) + "\n"


def looks_like_eval_output(path: Path) -> bool:
    """An earlier `slm eval --output` file: JSON with exactly our top-level keys."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(payload, dict) and set(payload) in (set(EVAL_OUTPUT_KEYS), set(OLDER_EVAL_OUTPUT_KEYS))


def inside_a_run_or_export(path: Path) -> Optional[Path]:
    """The run dir (it holds metrics.jsonl), checkpoint or export (config.json + model.safetensors) that holds
    `path`."""
    for folder in path.resolve().parents:
        if (
            (folder / "metrics.jsonl").exists()
            or looks_like_checkpoint(folder)
            or ((folder / "config.json").exists() and (folder / "model.safetensors").exists())
        ):
            return folder
    return None


def check_output(output: str, force: bool) -> None:
    """--output may replace only an earlier slm eval result outside any run or export, unless --force."""
    path = Path(output)
    if path.is_dir():
        raise TrainError(f"--output {output} is a directory; expected the path of a JSON file to write.")
    if not path.parent.is_dir():
        raise TrainError(f"--output {output}: the folder {path.parent} does not exist; create it first.")
    if not path.exists() or force:
        return
    holder = inside_a_run_or_export(path)
    if holder is not None:
        raise TrainError(
            f"--output {output} exists inside {holder} (a run or an export): slm eval does not replace files "
            "there. Choose another path, or pass --force to replace it."
        )
    if not looks_like_eval_output(path):
        raise TrainError(
            f"--output {output} exists and is not an earlier slm eval result; refusing to overwrite it. Choose "
            "another path, or pass --force to replace it."
        )


def eval_cli(
    model: Optional[str],
    tasks: str,
    limit: Optional[int] = None,
    shots: int = 0,
    batch_size: int = 32,
    output: Optional[str] = None,
    force: bool = False,
    data_dir: Optional[str] = None,
    seed: Optional[int] = None,
    device: str = "auto",
    fetch_data: bool = False,
) -> int:
    """Fetch the data and/or evaluate; returns the exit code."""
    if fetch_data:
        where = fetch_eval_data(data_dir)
        say(f"eval data in {where} (use --data-dir {where})")
        data_dir = str(where)
        if model is None:
            return 0
    if model is None:
        raise TrainError(
            "slm eval needs MODEL (a run dir, checkpoint or export) unless only --fetch-data is given."
        )
    for flag, value, low in (("--limit", limit, 1), ("--shots", shots, 0), ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            raise TrainError(f"{flag} is {value}; expected an integer >= {low}.")
    if output and output != "-":
        check_output(output, force)
    names = [name for name in tasks.split(",") if name.strip()]
    if not names:
        raise TrainError(
            "--tasks is empty; give comma-separated task names, e.g. --tasks hellaswag,arc_easy."
        )
    torch_device = init_process_group(device)
    try:
        source = locate_weights(model)
        tokenizer = load_tokenizer(source.tokenizer_path)
        state_dict, cfg = load_weights(source)
        net = build_model(state_dict, cfg, torch.float32).to(torch_device)
        task_requests = build_task_requests(
            names, tokenizer, limit=limit, seed=seed, shots=shots, data_dir=data_dir
        )
        result = score_tasks(net, task_requests, batch_size=batch_size, device=torch_device)
        rank, world_size = world()
        if rank == 0:
            table = format_table(result, task_requests, world_size, torch_device, shots)
            print(table, file=sys.stderr if output == "-" else sys.stdout, flush=True)
            if output:
                settings = {
                    "limit": limit,
                    "seed": seed,
                    "shots": shots,
                    "batch_size": batch_size,
                    "data_dir": data_dir,
                    "processes": world_size,
                    "device": torch_device.type,
                }
                payload = result_json(str(model), result, task_requests, settings)
                if output == "-":
                    sys.stdout.write(payload)
                    sys.stdout.flush()
                else:
                    atomic_write_text(output, payload)
                    say(f"wrote {output}")
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return 0
