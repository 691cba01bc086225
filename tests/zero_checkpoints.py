"""Write small DeepSpeed checkpoints in slm-forge's layout, independent of the trainer (run under torchrun).

    torchrun --nproc_per_node 2 tests/zero_checkpoints.py OUT_DIR TOKENIZER_JSON

For each variant: a tiny model trained 2 steps (different data per rank) with ZeRO, reference logits and loss
of the live engine on fixed tokens (OUT_DIR/<variant>/reference.safetensors), then
OUT_DIR/<variant>/checkpoints/step_00000002/ with DeepSpeed's files, meta.json, tokenizer.json and COMPLETE.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from tests.helpers import REPO, built_once_per_run, free_port, run

STEPS = 2
VARIANTS = {
    # name: (model overrides, ZeRO stage, precision, train.stage)
    "zero3_tied_gqa": (dict(tie_embeddings=True, n_heads=4, n_kv_heads=2), 3, "fp32", "pretrain"),
    "zero3_untied_mha": (dict(tie_embeddings=False, n_heads=4, n_kv_heads=4), 3, "fp32", "ift"),
    "zero2_bf16_untied_gqa": (dict(tie_embeddings=False, n_heads=4, n_kv_heads=1), 2, "bf16", "pretrain"),
}


def reference_tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(123))


def build_checkpoints(tmp_path_factory, tokenizer_path: Path) -> Path:
    """Run this script once per pytest run (2 processes, ~15 s) and share its output folder with every worker:
    read-only (copy what a test changes)."""

    def build(out_dir: Path) -> None:
        run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(free_port()),
                str(REPO / "tests" / "zero_checkpoints.py"),
                str(out_dir),
                str(tokenizer_path),
            ],
            timeout=300,
        )

    name = "zero_checkpoints_" + hashlib.sha256(str(tokenizer_path).encode()).hexdigest()[:12]
    return built_once_per_run(tmp_path_factory, name, build)


def step_dir(checkpoints: Path, variant: str) -> Path:
    return checkpoints / variant / "checkpoints" / f"step_{STEPS:08d}"


def main() -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from common.files import file_sha256
    from data_pipeline.tokenizer import load_tokenizer, model_vocab_size
    from launch.config import Config, to_dict
    from model import ModelConfig, Transformer
    from train.checkpoint import COMPLETE, LATEST, META, step_tag, tokenizer_file
    from train.config import TrainConfig
    from train.distributed import skip_cpu_shm_comm_op

    out_dir, tokenizer_path = Path(sys.argv[1]), Path(sys.argv[2])
    skip_cpu_shm_comm_op()  # as slm train does: no JIT build of an op training never uses, no lock left by a kill
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    vocab_size = model_vocab_size(load_tokenizer(tokenizer_path))
    for name, (overrides, zero_stage, precision, stage) in VARIANTS.items():
        cfg = ModelConfig(
            n_layers=2,
            d_model=64,
            ffn_hidden=96,
            vocab_size=vocab_size,
            max_seq_len=64,
            init_std=0.1,
            **overrides,
        )
        torch.manual_seed(0)
        model = Transformer(cfg)
        ds_config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "train_batch_size": 2 * world_size,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": precision == "bf16"},
            "steps_per_print": 2**62,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        data = torch.Generator().manual_seed(1000 + rank)
        for _ in range(STEPS):
            tokens = torch.randint(0, vocab_size, (2, 33), generator=data)
            _, loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            engine.step()
        engine.eval()
        tokens = reference_tokens(vocab_size)
        with torch.no_grad():
            logits = engine(tokens[:, :-1])[0]  # with targets the (chunked) loss path returns no logits
            loss = engine(tokens[:, :-1], tokens[:, 1:])[1]
        variant_dir = out_dir / name
        ckpt_dir = variant_dir / "checkpoints"
        tag = step_tag(STEPS)
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        dist.barrier()
        if rank == 0:
            save_file(
                {"tokens": tokens, "logits": logits.float().contiguous(), "loss": loss.float().reshape(1)},
                str(variant_dir / "reference.safetensors"),
            )
            run_cfg = Config(
                model=cfg, train=TrainConfig(zero_stage=zero_stage, precision=precision, stage=stage)
            )
            meta = {
                "step": STEPS,
                "tokens_seen": STEPS * 2 * world_size * 32,
                "config": to_dict(run_cfg),
                "tokenizer_sha256": file_sha256(tokenizer_path),
                "manifest_sha256": "none",
                "world_size": world_size,
                "zero_stage": zero_stage,
            }
            (ckpt_dir / tag / META).write_text(json.dumps(meta, indent=2))
            shutil.copyfile(tokenizer_path, tokenizer_file(ckpt_dir / tag))
            (ckpt_dir / tag / COMPLETE).write_text(tag + "\n")
            (ckpt_dir / LATEST).write_text(tag + "\n")
        dist.barrier()
        engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
