"""`slm export --gguf`: model.gguf for llama.cpp, written with ggml's own `gguf` package (optional dependency).

What llama.cpp's convert_hf_to_gguf.py would write for our LlamaForCausalLM, minus its tokenizer guessing: the
stock converter identifies a BPE pre-tokenizer by hashing the ids of a probe text, so every newly trained
tokenizer is "not recognized". Ours is GPT-2's byte-level BPE (the same split regex, no prefix space), so it is
declared as `tokenizer.ggml.pre = "gpt-2"` here. Tensors get llama.cpp's names; q/k rows are permuted from the
rotate_half RoPE layout to llama.cpp's interleaved one (as the converter does). fp32 exports write F32 tensors,
bf16 exports BF16; norms are always F32. The file is read back with gguf.GGUFReader and checked tensor by tensor.
Checked once by hand against llama.cpp's converter (llama-cpp-python 0.3.36's copy) with its pre-tokenizer
forced to "gpt-2": byte-identical tensors and tokenizer fields; it adds only descriptive general.* keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from data_pipeline.instruct.chat import CHAT_TEMPLATE
from data_pipeline.tokenizer import EOT, IM_END, PAD, load_tokenizer
from model.config import ModelConfig
from train.errors import TrainError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
"""gguf.TokenType values of ordinary, special and padding (never produced) tokens."""
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
"""Our (= transformers') per-layer module names -> llama.cpp's blk.N.* names."""
PLAIN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
"""The ChatML template without TRL's {% generation %} markers, which llama.cpp's Jinja engine need not know."""


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise TrainError(
            "`slm export --gguf` needs the gguf package (ggml's GGUF writer): "
            "pip install 'slm-forge[gguf]' or pip install gguf."
        ) from None
    return gguf


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name."""
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, layer, rest = name.split(".", 2)
    module = rest.rsplit(".", 1)[0]
    return f"blk.{layer}.{LAYER_NAMES[module]}.weight"


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from rotate_half order (x[:d/2], x[d/2:]) to llama.cpp's pairs (x0, x1), (x2, x3)... per head."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """llama.cpp-named fp32 tensors (lm_head left out when tied: llama.cpp reuses token_embd)."""
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.detach().to("cpu", torch.float32)
        if name.endswith("q_proj.weight"):
            tensor = interleave_rope_rows(tensor, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = interleave_rope_rows(tensor, cfg.n_kv_heads)
        out[gguf_name(name)] = tensor
    return out


def vocabulary(tokenizer_json: Path, vocab_size: int) -> tuple[List[str], List[int], List[str]]:
    """Tokens by id (padded to the model's vocab_size), their gguf token types, and the BPE merges as "a b"."""
    tokenizer = load_tokenizer(tokenizer_json)
    by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {int(i) for i in tokenizer.get_added_tokens_decoder()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(TOKEN_CONTROL if i in special else TOKEN_NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
    merges = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"].get("merges", [])
    return tokens, types, [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_gguf(
    export_dir: Path, path: Path, state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, verify: bool = True
) -> Path:
    """Write `path` from an export folder's config/tokenizer and our-named weights; check it by reading it back."""
    gguf = require_gguf()
    hf_config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = export_dir / "tokenizer.json"
    bf16 = hf_config.get("torch_dtype") == "bfloat16"
    tokens, types, merges = vocabulary(tokenizer_json, cfg.vocab_size)
    ids = {token: tokens.index(token) for token in (EOT, IM_END, PAD)}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(
        "slm-forge " + ("chat" if hf_config["eos_token_id"] == ids[IM_END] else "base") + " model"
    )
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden_size)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids[EOT])
    writer.add_eos_token_id(hf_config["eos_token_id"])
    writer.add_pad_token_id(ids[PAD])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(PLAIN_CHAT_TEMPLATE)
    expected = {}
    for name, tensor in gguf_tensors(state_dict, cfg).items():
        array = tensor.numpy()
        if bf16 and array.ndim > 1:
            array = gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, array)
        expected[name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if verify:
        check_gguf(path, expected, tokens)
    return path


def check_gguf(path: Path, expected: Dict[str, np.ndarray], tokens: List[str]) -> None:
    """TrainError unless gguf.GGUFReader reads back exactly these tensors and tokens."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(expected):
        raise TrainError(
            f"GGUF check failed: {path} holds tensors {sorted(set(found) ^ set(expected))[:6]} "
            "that differ from the ones written."
        )
    for name, array in expected.items():
        data = np.asarray(found[name].data)
        if data.size != array.size or not np.array_equal(data.reshape(array.shape), array):
            raise TrainError(f"GGUF check failed: tensor {name} in {path} does not read back as written.")
    field = reader.fields["tokenizer.ggml.tokens"]
    read_tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    if read_tokens != tokens:
        raise TrainError(f"GGUF check failed: the token list in {path} does not read back as written.")
