"""`make demo`: the whole life of a tiny model on this machine, each step a real `slm` command.

prepare -> pretrain (ZeRO-2, 2 CPU processes under torchrun) -> continued pretraining with replay ->
instruction fine-tuning on the bundled self-instruct tasks -> Hugging Face export -> transformers answers.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("SLM_DEMO_DIR", "runs/demo"))
NPROC = os.environ.get("SLM_DEMO_NPROC", "2")
PRETRAIN_STEPS = os.environ.get("SLM_DEMO_STEPS", "600")
BIN = Path(sys.executable).parent


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def sh(*cmd: str) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    started = time.time()
    code = subprocess.call(list(cmd), cwd=REPO)
    if code != 0:
        sys.exit(f"demo: step failed with exit code {code}: {' '.join(cmd)}")
    print(f"({time.time() - started:.0f} s)", flush=True)


def slm(*args: str) -> None:
    sh(str(BIN / "slm"), *args)


def torchrun_slm(*args: str) -> None:
    sh(
        str(BIN / "torchrun"),
        "--nproc_per_node",
        NPROC,
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "launch",
        *args,
    )


def write_slices() -> tuple[Path, Path]:
    """Pretrain on the first 85% of tinyshakespeare; continue pretraining on the rest (a 'new domain')."""
    corpus = DEMO / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = text.index("\n\n", int(len(text) * 0.85))
    first, second = corpus / "pretrain.txt", corpus / "cpt.txt"
    first.write_text(text[:cut] + "\n", encoding="utf-8")
    second.write_text(text[cut + 2 :], encoding="utf-8")
    return first, second


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pretrain_text, cpt_text = write_slices()
    data, cpt_data = DEMO / "data", DEMO / "cpt_data"
    pretrain, cpt, ift, export = DEMO / "pretrain", DEMO / "cpt", DEMO / "ift", DEMO / "export"

    banner("1. model summary")
    slm("model", "summary", "configs/tiny.yaml", "--world-size", NPROC)

    banner("2. prepare: train the tokenizer, write token shards and the manifest")
    slm(
        "prepare",
        "configs/tiny.yaml",
        f"data.dir={data}",
        f"data.sources=[{{path: {pretrain_text}, doc_boundary: blank_line}}]",
    )

    banner(f"3. pretrain: ZeRO-2 on {NPROC} CPU processes (torchrun)")
    torchrun_slm(
        "train",
        "configs/tiny.yaml",
        f"run.dir={pretrain}",
        f"data.dir={data}",
        f"train.max_steps={PRETRAIN_STEPS}",
        "eval.every=200",
        "checkpoint.every=200",
    )
    slm("report", str(pretrain))
    slm(
        "generate",
        str(pretrain),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "60",
        "--temperature",
        "0.8",
        "--top-k",
        "50",
    )

    banner("4. continued pretraining on new text, replaying 25% of the original data")
    slm(
        "prepare",
        "configs/tiny.yaml",
        f"data.dir={cpt_data}",
        f"tokenizer.path={data / 'tokenizer.json'}",
        f"data.sources=[{{path: {cpt_text}, doc_boundary: blank_line, weight: 3}},"
        f" {{path: {pretrain_text}, doc_boundary: blank_line, weight: 1}}]",
    )
    torchrun_slm(
        "train",
        "configs/tiny.yaml",
        f"run.dir={cpt}",
        f"data.dir={cpt_data}",
        "train.stage=cpt",
        f"train.init_from={pretrain}",
        "train.max_steps=150",
        "schedule.warmup_steps=15",
        "optim.lr=1e-3",
        "schedule.min_lr=1e-4",
        "eval.every=75",
        "checkpoint.every=150",
        f"data.sources=[{{path: {cpt_text}, doc_boundary: blank_line, weight: 3}},"
        f" {{path: {pretrain_text}, doc_boundary: blank_line, weight: 1}}]",
    )

    banner("5. instruction fine-tuning on the bundled self-instruct seed tasks")
    torchrun_slm(
        "train",
        "configs/tiny.yaml",
        f"run.dir={ift}",
        f"data.dir={cpt_data}",
        "train.stage=ift",
        f"train.init_from={cpt}",
        "train.max_steps=150",
        "schedule.warmup_steps=10",
        "optim.lr=1e-3",
        "schedule.min_lr=1e-4",
        "eval.every=75",
        "checkpoint.every=150",
        "model.max_seq_len=512",
        "train.micro_batch_size=4",
    )

    banner("6. export to the Hugging Face format (verified against transformers)")
    slm("export", str(ift), str(export), "--dtype", "fp32")

    banner("7. transformers loads the export and answers an instruction (greedy)")
    sh(sys.executable, "-c", ANSWER, str(export))


ANSWER = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
messages = [{"role": "user", "content": "Give me three tips for a good night's sleep."}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=48, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
print("user:", messages[0]["content"])
print("assistant:", tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
"""

if __name__ == "__main__":
    main()
