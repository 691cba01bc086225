"""`slm export SRC OUT_DIR`: a checkpoint (any ZeRO stage, any number of ranks) -> a Hugging Face Llama folder.

OUT_DIR holds config.json, model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json
above `max_shard_bytes`), generation_config.json, tokenizer.json (byte-identical copy), tokenizer_config.json
(with the ChatML chat template), special_tokens_map.json, README.md (the model card, train/handoff/model_card.py) and,
with `gguf=True`, model.gguf for llama.cpp (train/handoff/gguf_export.py). No pickle anywhere. It is assembled in a temporary
sibling folder, verified, and only then renamed into place, so OUT_DIR is either complete and checked or absent.

Verification (when transformers is installed): AutoModelForCausalLM and AutoTokenizer load the folder; a few
random sequences must give the same logits as our Transformer with the same weights, and the tokenizers must
encode a sample (special tokens included) and a chat (via apply_chat_template) to the same ids as ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save_file

from common.atomic import FILE_MODE, atomic_dir
from common.files import GIB, file_sha256
from common.log import say
from data_pipeline.instruct.chat import encode_chat_prompt, format_chat
from data_pipeline.tokenizer import EOT, IM_END, IM_START, PAD, load_tokenizer
from model.config import ModelConfig
from model.loss import IGNORE_INDEX
from train.errors import TrainError
from train.handoff.export_target import check_export_target, write_marker
from train.handoff.gguf_export import require_gguf, write_gguf
from train.handoff.hf_format import (
    HF_DTYPE_NAMES,
    TORCH_DTYPES,
    generation_config,
    hf_config,
    special_ids,
    special_tokens_map,
    to_hf_state_dict,
    tokenizer_config,
)
from train.handoff.init_from import build_model, load_weights, locate_weights
from train.handoff.model_card import CardFacts, facts_from_record, model_card
from train.handoff.shapes import check_state_dict

DEFAULT_MAX_SHARD_BYTES = 2 * GIB
"""Above this many bytes the weights are split into shards with an index (as transformers does)."""
LOGITS_TOLERANCE = 1e-4
"""Largest allowed |ours - transformers| logit difference, relative to the logits' standard deviation."""
TOKENIZER_SAMPLE = (
    f"{IM_START}user\nWhat is 2+2?  Tabs\tand\n\nblank lines, accents: café, naïve; emoji 🚀{IM_END}\n"
    f"{IM_START}assistant\n4.{IM_END}\n{EOT}ROMEO: But soft! what light through yonder window breaks?{PAD}"
)
CHAT_SAMPLE = [
    {"role": "system", "content": "You are concise."},
    {"role": "user", "content": "Name a colour.\n\nOne word."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "  Red.\n"},
]


def write_safetensors(
    hf_state_dict: Dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int, metadata: Dict[str, str]
) -> List[str]:
    """model.safetensors, or shards + model.safetensors.index.json when larger than max_shard_bytes."""
    shards: List[Dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in hf_state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.contiguous()
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=metadata)
        os.chmod(out_dir / "model.safetensors", FILE_MODE)  # safetensors writes 0600; the rest are 0644-ish
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, str(out_dir / file_name), metadata=metadata)
        os.chmod(out_dir / file_name, FILE_MODE)
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in hf_state_dict.values())
    write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    return names


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def export_from_model(
    model_state_dict: Dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "bf16",
    chat: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    verify: bool = True,
    provenance: Optional[Dict[str, Any]] = None,
    card: Optional[CardFacts] = None,
    gguf: bool = False,
) -> Path:
    """Write (atomically) and verify a LlamaForCausalLM folder from our-named weights; returns OUT_DIR.

    `chat` makes <|im_end|> the tokenizer's and config's eos (for instruction-tuned models); `provenance`
    (step, source, ...) goes into the safetensors metadata; `card` feeds the model card; `gguf` adds model.gguf.
    """
    if gguf:
        require_gguf()  # before any work: a clear error if the optional package is missing
    if dtype not in TORCH_DTYPES:
        raise TrainError(
            f"Export dtype {dtype!r} is not supported; expected one of {', '.join(TORCH_DTYPES)}."
        )
    tokenizer_path = Path(tokenizer_path)
    load_tokenizer(tokenizer_path)  # clear error if missing or lacking the special tokens
    state_dict = {
        name: tensor.detach().to("cpu", TORCH_DTYPES[dtype]) for name, tensor in model_state_dict.items()
    }
    if model_cfg.tie_embeddings and "lm_head.weight" not in state_dict:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    check_state_dict(state_dict, model_cfg, "the model being exported")
    ids = special_ids(tokenizer_path)
    metadata = {"format": "pt", "tokenizer_sha256": file_sha256(tokenizer_path), "exported_by": "slm-forge"}
    metadata.update({key: str(value) for key, value in (provenance or {}).items()})
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(to_hf_state_dict(state_dict, model_cfg), tmp, max_shard_bytes, metadata)
        write_json(tmp / "config.json", hf_config(model_cfg, ids, dtype, chat))
        write_json(tmp / "generation_config.json", generation_config(ids))
        (tmp / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
        write_json(tmp / "tokenizer_config.json", tokenizer_config(ids, model_cfg.max_seq_len, chat))
        write_json(tmp / "special_tokens_map.json", special_tokens_map(chat))
        (tmp / "README.md").write_text(model_card(model_cfg, state_dict, dtype, chat, card), encoding="utf-8")
        if verify:
            verify_export(tmp, state_dict, model_cfg, tokenizer_path)
        if gguf:
            write_gguf(tmp, tmp / "model.gguf", state_dict, model_cfg, verify=verify)
        write_marker(tmp, metadata)  # last: it lists every file the export holds
    return out_dir


def export(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "bf16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    verify: bool = True,
    gguf: bool = False,
    force: bool = False,
) -> Path:
    """SRC: a run dir (its latest complete checkpoint), a checkpoint step folder, or an export (re-export).

    `force` lets the export replace a previous export at OUT_DIR; nothing else is ever replaced."""
    check_export_target(out_dir, src, force)
    source = locate_weights(src)
    check_export_target(out_dir, source.path, force)
    state_dict, cfg = load_weights(source)
    stage, provenance = "pretrain", {"source": str(source.path)}
    card = CardFacts(source=str(source.path))
    if source.record is not None:
        card = facts_from_record(source.path, source.record)
        stage = source.record.identity.stage
        provenance.update(step=source.record.step, tokens_seen=source.record.tokens_seen, stage=stage)
    chat = stage == "ift" or (source.kind == "export" and _export_is_chat(source.path))
    card.stage = "ift" if chat else card.stage
    out = export_from_model(
        state_dict,
        cfg,
        source.tokenizer_path,
        out_dir,
        dtype=dtype,
        chat=chat,
        max_shard_bytes=max_shard_bytes,
        verify=verify,
        provenance=provenance,
        card=card,
        gguf=gguf,
    )
    print(f"exported {source.path} -> {out} ({HF_DTYPE_NAMES[dtype]}, {'chat' if chat else 'base'} model)")
    return out


def _export_is_chat(folder: Path) -> bool:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token") == IM_END
    except (OSError, ValueError):
        return False


def verify_export(
    folder: Path,
    state_dict: Dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_path: Path,
    n_sequences: int = 3,
    seq_len: int = 64,
) -> None:
    """Load `folder` with transformers; TrainError if its logits or tokenization differ from ours."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        say("note: transformers is not installed; the export was not verified against it.")
        return
    verbosity, progress_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no "sequence longer than model_max_length" warnings or progress bars
    hf_logging.disable_progress_bar()
    try:
        compare_with_transformers(folder, state_dict, cfg, tokenizer_path, n_sequences, seq_len)
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bars:
            hf_logging.enable_progress_bar()


def compare_with_transformers(
    folder: Path,
    state_dict: Dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_path: Path,
    n_sequences: int,
    seq_len: int,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = load_tokenizer(tokenizer_path)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    expected = ours.encode(TOKENIZER_SAMPLE, add_special_tokens=False).ids
    got = theirs(TOKENIZER_SAMPLE, add_special_tokens=False)["input_ids"]
    if got != expected:
        raise TrainError(
            f"Export check failed: transformers' tokenizer encodes the sample as {got[:24]}..., ours as "
            f"{expected[:24]}...; the exported tokenizer files are inconsistent with {tokenizer_path}."
        )
    for prompt, expected in (
        (False, format_chat(CHAT_SAMPLE, ours)[0]),
        (True, encode_chat_prompt(CHAT_SAMPLE[:2], ours)),
    ):
        got = _as_ids(
            theirs.apply_chat_template(
                CHAT_SAMPLE[:2] if prompt else CHAT_SAMPLE, add_generation_prompt=prompt
            )
        )
        if got != expected:
            raise TrainError(
                f"Export check failed: apply_chat_template gives {got[:24]}..., our chat formatting "
                f"{expected[:24]}... (add_generation_prompt={prompt})."
            )
    rendered = theirs.apply_chat_template(CHAT_SAMPLE, return_dict=True, return_assistant_tokens_mask=True)
    expected_mask = [int(label != IGNORE_INDEX) for label in format_chat(CHAT_SAMPLE, ours)[1]]
    if list(rendered["assistant_masks"]) != expected_mask:
        raise TrainError(
            "Export check failed: the chat template's {% generation %} span is not the span our IFT "
            "stage puts loss on, so TRL's assistant_only_loss would train other tokens."
        )

    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).float().eval()
    our_model = build_model(state_dict, cfg, torch.float32)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, cfg.vocab_size, (n_sequences, min(seq_len, cfg.max_seq_len)), generator=generator
    )
    with torch.no_grad():
        expected_logits, _ = our_model(tokens)
        hf_logits = hf_model(input_ids=tokens).logits.float()
    if hf_logits.shape != expected_logits.shape:
        raise TrainError(
            f"Export check failed: transformers' logits have shape {tuple(hf_logits.shape)}, ours "
            f"{tuple(expected_logits.shape)}."
        )
    scale = expected_logits.std().item() + 1e-12
    diff = (hf_logits - expected_logits).abs().max().item()
    if not diff <= LOGITS_TOLERANCE * scale:
        raise TrainError(
            f"Export check failed: transformers' logits differ from ours by up to {diff:.3g} "
            f"(logit std {scale:.3g}, allowed {LOGITS_TOLERANCE:g} x std); the conversion is wrong."
        )


def _as_ids(encoded: Any) -> List[int]:
    """apply_chat_template's ids (a list in transformers 4.x, a BatchEncoding in 5.x)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]
