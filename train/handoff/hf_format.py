"""Our model <-> Hugging Face `LlamaForCausalLM`: parameter names, config.json, tokenizer and generation files.

Our parameter names are Llama's minus the "model." prefix and our RoPE uses the same rotate_half convention,
so the weights convert by renaming alone (no permutation of q/k rows, unlike Meta-checkpoint conversions).
With tied embeddings only `model.embed_tokens.weight` is stored, as transformers' own save_pretrained does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from common.json_fields import field_problem
from data_pipeline.instruct.chat import CHAT_TEMPLATE
from data_pipeline.tokenizer import EOT, IM_END, IM_START, PAD, load_tokenizer
from model.config import ModelConfig
from train.errors import TrainError
from train.handoff.shapes import check_state_dict

HF_PREFIX = "model."
HEAD = "lm_head.weight"
EMBED = "embed_tokens.weight"
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}


def to_hf_state_dict(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our names -> LlamaForCausalLM names (lm_head left out when tied)."""
    out = {}
    for name, tensor in state_dict.items():
        if name == HEAD:
            if not cfg.tie_embeddings:
                out[HEAD] = tensor
        else:
            out[HF_PREFIX + name] = tensor
    return out


def from_hf_state_dict(hf_state_dict: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """LlamaForCausalLM names -> ours, with lm_head.weight = embed_tokens.weight when tied (as load_state_dict wants)."""
    out = {}
    for name, tensor in hf_state_dict.items():
        if name == HEAD:
            out[HEAD] = tensor
        elif name.startswith(HF_PREFIX):
            out[name[len(HF_PREFIX) :]] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports carry; we recompute it
            out[name] = tensor
    if cfg.tie_embeddings and EMBED in out:
        out[HEAD] = out[EMBED]
    return out


def special_ids(tokenizer_path: Path) -> Dict[str, int]:
    tokenizer = load_tokenizer(tokenizer_path)
    return {token: int(tokenizer.token_to_id(token)) for token in (EOT, IM_START, IM_END, PAD)}


def hf_config(cfg: ModelConfig, ids: Dict[str, int], dtype: str, chat: bool) -> Dict[str, Any]:
    """config.json of a LlamaForCausalLM with our shapes (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": ids[EOT],
        "eos_token_id": ids[IM_END] if chat else ids[EOT],
        "pad_token_id": ids[PAD],
        "use_cache": True,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
        "dtype": HF_DTYPE_NAMES[dtype],
    }


HF_CONFIG_FIELDS = {
    "model_type": str,
    "num_hidden_layers": int,
    "hidden_size": int,
    "num_attention_heads": int,
    "num_key_value_heads": (int, None),
    "intermediate_size": int,
    "vocab_size": int,
    "max_position_embeddings": int,
    "rope_theta": float,
    "rope_parameters": (dict, None),
    "rope_scaling": (dict, None),
    "rms_norm_eps": float,
    "tie_word_embeddings": bool,
    "initializer_range": float,
    "attention_bias": bool,
    "mlp_bias": bool,
    "hidden_act": str,
    "head_dim": (int, None),
}
"""The JSON type of each Llama config.json field we read (a hand-edited one is refused naming the field)."""


def model_config_from_hf(config: Dict[str, Any], source: str) -> ModelConfig:
    """Our ModelConfig from a Llama config.json (refusing features our model does not have)."""
    problem = field_problem(config, HF_CONFIG_FIELDS)
    if problem:
        raise TrainError(f"{source} is not a Llama config.json we can load: {problem}.")
    if config.get("model_type") != "llama":
        raise TrainError(
            f"{source}: model_type is {config.get('model_type')!r}; expected 'llama' (a LlamaForCausalLM export)."
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise TrainError(
            f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported; expected default RoPE."
        )
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        raise TrainError(f"{source}: biases or a non-SiLU activation are not supported by our Llama model.")
    try:
        heads = int(config["num_attention_heads"])
        cfg = ModelConfig(
            n_layers=int(config["num_hidden_layers"]),
            d_model=int(config["hidden_size"]),
            n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads),
            ffn_hidden=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            max_seq_len=int(config["max_position_embeddings"]),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            norm_eps=float(config["rms_norm_eps"]),
            tie_embeddings=bool(config.get("tie_word_embeddings", True)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except KeyError as err:
        raise TrainError(f"{source}: config.json lacks the key {err.args[0]!r} of a Llama config.") from None
    except (TypeError, ValueError) as err:  # e.g. a rope_parameters value that is not a number
        raise TrainError(f"{source}: a value of config.json has the wrong type ({err}).") from None
    if config.get("head_dim") not in (None, cfg.head_dim):
        raise TrainError(
            f"{source}: head_dim {config['head_dim']} differs from hidden_size / num_attention_heads; not supported."
        )
    try:
        cfg.validate()
    except ValueError as err:
        raise TrainError(f"{source}: {err}") from None
    return cfg


def tokenizer_config(ids: Dict[str, int], max_len: int, chat: bool) -> Dict[str, Any]:
    """tokenizer_config.json: a PreTrainedTokenizerFast over tokenizer.json, with our ChatML template.

    No token_type_ids (a Llama takes none; transformers 4.x generate refuses them), left padding (batched
    generation appends to the real last token). Base and chat exports both carry the ChatML template (so SFT on
    messages trains our IFT format); a base export's eos stays <|endoftext|>, the token it was trained to end a
    document with, while generation_config.json stops at either (see docs/downstream.md).
    """
    added = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, i in sorted(ids.items(), key=lambda kv: kv[1])
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": EOT,
        "eos_token": IM_END if chat else EOT,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map(chat: bool) -> Dict[str, Any]:
    return {
        "bos_token": EOT,
        "eos_token": IM_END if chat else EOT,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
    }


def generation_config(ids: Dict[str, int]) -> Dict[str, Any]:
    """Stop at the end of a document or of an assistant turn, whichever comes first."""
    return {"bos_token_id": ids[EOT], "eos_token_id": [ids[EOT], ids[IM_END]], "pad_token_id": ids[PAD]}


def read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"{path} could not be read as JSON ({err}).") from None


def safetensors_files(folder: Path) -> Optional[List[Path]]:
    """The weight files of an export (sharded via model.safetensors.index.json, or one model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TrainError(
                f"{index} has no weight_map; expected the index of a sharded safetensors export."
            )
        names = sorted({str(name) for name in weight_map.values()})
        outside = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if outside:
            raise TrainError(
                f"{index} names the weight file {outside[0]!r}; expected a *.safetensors file name inside "
                f"{folder} (an index never points outside its export, nor at another format)."
            )
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return None


def load_hf_folder(folder: Path) -> tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Weights (our names, as stored dtype) and ModelConfig of a LlamaForCausalLM folder; never unpickles."""
    from safetensors.torch import load_file

    cfg = model_config_from_hf(read_json(folder / "config.json"), str(folder / "config.json"))
    files = safetensors_files(folder)
    if files is None:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (
            f" It has {', '.join(pickled)}: pickled weights are refused (convert them to safetensors)."
            if pickled
            else ""
        )
        raise TrainError(
            f"{folder} has config.json but no model.safetensors or model.safetensors.index.json.{hint}"
        )
    hf_state_dict: Dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise TrainError(
                f"{file} is listed in {folder / 'model.safetensors.index.json'} but does not exist."
            )
        try:
            hf_state_dict.update(load_file(str(file)))
        except (
            Exception
        ) as err:  # safetensors raises its own SafetensorError (truncated header, bad offsets...)
            raise TrainError(
                f"{file} could not be read as safetensors ({type(err).__name__}: {err}); the file is truncated or "
                "damaged. Export the model again."
            ) from None
    state_dict = from_hf_state_dict(hf_state_dict, cfg)
    check_state_dict(state_dict, cfg, str(folder))
    return state_dict, cfg
