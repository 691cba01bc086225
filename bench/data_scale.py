"""The data pipeline at cluster scale: memory and speed that must not grow with the corpus.

1. verify: manifest load + size check of N shards (one listing) against one stat per shard, locally.
2. loader: per-process peak RSS, time to the first batch and tokens/s of the train loader over corpora of
   1B, 200B and 1T tokens (sparse shard files: nothing is written but the manifest), seq 2048, batch 8,
   against the 8 bytes per window a full permutation per epoch held before (data_pipeline/loading/order.py).
3. s3: the loader through a real S3 server (SeaweedFS on loopback, as the tests start it) on the
   tinyshakespeare data: whole-shard cache against ranged reads (data.cache_limit below one shard).
4. parts: `slm prepare` in one process against --part 1/2 and 2/2 in parallel plus --merge.

    .venv/bin/python bench/data_scale.py [--sizes 1e9,200e9,1e12] [--shards 100000] [--out docs/x.md]

Each loader measurement runs in a fresh subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

SEQ, BATCH = 2048, 8
H100_125M_TOKENS_S = 140_000
"""What a 125M model consumes on one H100 (llm-foundry's published throughput table)."""
H100_25M_TOKENS_S = 5 * H100_125M_TOKENS_S
"""What a 25M model consumes on one H100, estimated: FLOPs per token scale with the parameters (5x fewer) at the
same MFU; an upper bound, since a small model's MFU is lower."""


def tokenizer_file(work: Path) -> Path:
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    path = work / "tokenizer.json"
    if not path.exists():
        text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        save_tokenizer(train_tokenizer(iter([text.split("\n\n")]), 4096, 2, threads=1, target=path), path)
    return path


def sparse_dataset(folder: Path, tokens: int, shard_tokens: int, tokenizer: Path) -> Path:
    """A dataset of sparse uint16 shards (all zeros, no disk used) with a real manifest."""
    from data_pipeline.format.manifest import FORMAT_VERSION

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer, folder / "tokenizer.json")
    records, left, index = [], tokens, 0
    while left > 0:
        n = min(shard_tokens, left)
        name = f"big-train-{index:06d}.bin"
        with open(folder / name, "wb") as f:
            f.truncate(2 * n)
        records.append(
            {
                "file": name,
                "split": "train",
                "source": "big",
                "index": index,
                "dtype": "uint16",
                "tokens": n,
                "documents": 0,
                "text_bytes": n,
                "sha256": "0" * 64,
            }
        )
        left, index = left - n, index + 1
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "tokenizer_sha256": hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest(),
        "vocab_size": 4096,
        "eot_id": 0,
        "val_fraction": 0.0,
        "shard_tokens": shard_tokens,
        "sources": [{"name": "big", "documents": 0}],
        "shards": records,
        "prepared_from": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def bench_verify(work: Path, shards: int, tokenizer: Path) -> Dict[str, float]:
    from data_pipeline.format.manifest import load_manifest, verify_dataset

    folder = sparse_dataset(work / f"verify{shards}", shards * 4, 4, tokenizer)
    started = time.perf_counter()
    manifest = load_manifest(folder)
    loaded = time.perf_counter()
    verify_dataset(manifest, splits=("train",))
    verified = time.perf_counter()
    for shard in manifest.shards:
        os.stat(folder / shard.file)
    statted = time.perf_counter()
    shutil.rmtree(folder)
    return {"load": loaded - started, "verify": verified - loaded, "stat each": statted - verified}


LOADER_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from data_pipeline.loading.loader import build_loader
start = time.perf_counter()
loader = build_loader({data!r}, "train", {seq}, {batch}, 0, 1, seed=1, **{kwargs})
next(loader)
first = time.perf_counter() - start
t = time.perf_counter(); n = 0
while time.perf_counter() - t < {seconds}:
    next(loader); n += 1
rate = n * {batch} * {seq} / (time.perf_counter() - t)
print(json.dumps({{"first_batch_s": first, "tokens_s": rate, "windows": loader.windows_per_epoch,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def loader_child(data: str, seconds: float, env=None, **kwargs) -> Dict[str, float]:
    code = LOADER_CHILD.format(
        repo=str(REPO), data=data, seq=SEQ, batch=BATCH, seconds=seconds, kwargs=kwargs
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_s3(work: Path, seconds: float) -> Dict[str, Dict[str, float]]:
    from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
    from data_pipeline.prepare.dispatch import prepare
    from tests.s3_localhost import BUCKET, start_s3

    local = work / "tiny"
    prepare(
        DataConfig(
            dir=str(local),
            num_proc=1,
            shard_tokens=65536,
            sources=[
                SourceConfig(path=str(REPO / "data" / "tinyshakespeare.txt"), doc_boundary="blank_line")
            ],
        ),
        TokenizerConfig(vocab_size=4096),
    )
    (work / "s3").mkdir(exist_ok=True)
    servers = start_s3(work / "s3")
    server = next(servers)
    try:
        fs = server.filesystem()
        for path in sorted(local.iterdir(), key=lambda p: p.name == "manifest.json"):
            if path.is_file() and path.suffix in (".bin", ".json"):
                fs.put_file(str(path), f"{BUCKET}/bench/{path.name}")
        url = f"s3://{BUCKET}/bench"
        global SEQ
        saved, SEQ = SEQ, 256  # the tiny corpus has few 2048-token windows
        try:
            return {
                "local shards": loader_child(str(local), seconds),
                "s3, whole-shard cache": loader_child(url, seconds, server.env, cache_dir=str(work / "c1")),
                "s3, cache_limit < one shard (ranged reads)": loader_child(
                    url, seconds, server.env, cache_dir=str(work / "c2"), cache_limit=1000
                ),
            }
        finally:
            SEQ = saved
    finally:
        servers.close()


def bench_parts(work: Path, copies: int) -> Dict[str, float]:
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    for i in range(copies):
        (corpus / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    tokenizer = tokenizer_file(work)
    base = [
        sys.executable,
        "-m",
        "launch",
        "prepare",
        str(REPO / "configs" / "tiny.yaml"),
        "data.num_proc=1",
        f"tokenizer.path={tokenizer}",
        f"data.sources=[{{path: {corpus}, doc_boundary: blank_line}}]",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def timed(cmds: List[List[str]]) -> float:
        started = time.perf_counter()
        procs = [
            subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
            for c in cmds
        ]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"prepare failed: {cmds}")
        return time.perf_counter() - started

    one = timed([base + [f"data.dir={work / 'one'}"]])
    two = [*base, f"data.dir={work / 'two'}"]
    timed([two + ["--tokenizer-only"]])
    parts = timed([two + ["--part", "1/2"], two + ["--part", "2/2"]])
    merge = timed([two + ["--merge"]])
    same = all((work / "one" / f).read_bytes() == (work / "two" / f).read_bytes() for f in ("manifest.json",))
    return {
        "one process": one,
        "2 parts in parallel": parts,
        "merge": merge,
        "identical manifest": float(same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e9,200e9,1e12", help="corpus sizes in tokens (sparse files)")
    parser.add_argument("--shard-tokens", type=float, default=2**30)
    parser.add_argument("--shards", default="10000,100000", help="shard counts for the verification bench")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--copies", type=int, default=8, help="tinyshakespeare files in the parts corpus")
    parser.add_argument("--skip", default="", help="comma list of benches to skip: verify,loader,s3,parts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    skip = set(args.skip.split(",")) - {""}
    work = Path(tempfile.mkdtemp(prefix="slm-data-scale-"))
    lines = [f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", ""]
    try:
        tokenizer = tokenizer_file(work)
        if "verify" not in skip:
            lines += [
                "| shards | load manifest (s) | verify sizes, one listing (s) | one stat per shard (s) |",
                "|---:|---:|---:|---:|",
            ]
            for n in (int(float(x)) for x in args.shards.split(",")):
                r = bench_verify(work, n, tokenizer)
                lines.append(f"| {n:,} | {r['load']:.2f} | {r['verify']:.2f} | {r['stat each']:.2f} |")
            lines.append("")
        if "loader" not in skip:
            lines += [
                f"| corpus tokens | shards | windows | old permutation (MB/process) | peak RSS (MB) | first batch (s) "
                f"| tokens/s | x 125M-on-H100 ({H100_125M_TOKENS_S:,}) | x 25M-on-H100 ({H100_25M_TOKENS_S:,}) |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for size in (int(float(x)) for x in args.sizes.split(",")):
                folder = sparse_dataset(work / f"sparse{size}", size, int(args.shard_tokens), tokenizer)
                r = loader_child(str(folder), args.seconds)
                shards = len(list(folder.glob("*.bin")))
                lines.append(
                    f"| {size:,} | {shards} | {r['windows']:,} | {r['windows'] * 8 / 1e6:,.0f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['first_batch_s']:.2f} | {r['tokens_s']:,.0f} | {r['tokens_s'] / H100_125M_TOKENS_S:.0f} | "
                    f"{r['tokens_s'] / H100_25M_TOKENS_S:.1f} |"
                )
                shutil.rmtree(folder)
            lines.append("")
        if "s3" not in skip:
            lines += [
                "| tinyshakespeare, seq 256, batch 8 | first batch (s) | tokens/s | peak RSS (MB) |",
                "|---|---:|---:|---:|",
            ]
            for name, r in bench_s3(work, args.seconds).items():
                lines.append(
                    f"| {name} | {r['first_batch_s']:.2f} | {r['tokens_s']:,.0f} | {r['peak_rss_mb']:.0f} |"
                )
            lines.append("")
        if "parts" not in skip:
            r = bench_parts(work, args.copies)
            lines += ["| prepare | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in r.items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
