"""`slm generate MODEL --prompt TEXT`: decode from a checkpoint, run dir or Hugging Face export, in fp32 on CPU/GPU.

Plain mode continues the text and stops at <|endoftext|>; --chat wraps the prompt as one user turn of the ChatML
template (exactly as in instruction tuning) and stops at <|im_end|>. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional

import torch

from data_pipeline.instruct.chat import encode_chat_prompt
from data_pipeline.tokenizer import EOT, IM_END, load_tokenizer
from train.errors import TrainError
from train.handoff.init_from import build_model, load_weights, locate_weights


def generate_ids(
    model: torch.nn.Module,
    prompt_ids: List[int],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    eos_id: int,
    seed: int,
) -> List[int]:
    """The new token ids after prompt_ids (the stop token itself left out)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = model.generate(
        tokens, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos_id, generator=generator
    )
    new = out[0, len(prompt_ids) :].tolist()
    return new[: new.index(eos_id)] if eos_id in new else new


def generate_cli(
    model: str | os.PathLike,
    prompt: str,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    seed: int = 0,
) -> int:
    """Print the prompt and its continuation; returns the exit code."""
    if not math.isfinite(temperature) or temperature < 0:
        raise TrainError(f"--temperature is {temperature}; expected 0 (greedy) or a positive number.")
    if max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens is {max_new_tokens}; expected a positive integer.")
    if top_k is not None and top_k < 1:
        raise TrainError(f"--top-k is {top_k}; expected a positive integer.")
    source = locate_weights(model)
    tokenizer = load_tokenizer(source.tokenizer_path)
    state_dict, cfg = load_weights(source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = build_model(state_dict, cfg, torch.float32).to(device)
    if chat:
        prompt_ids = encode_chat_prompt([{"role": "user", "content": prompt}], tokenizer)
        stop = IM_END
    else:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [tokenizer.token_to_id(EOT)]
        stop = EOT
    new_ids = generate_ids(
        net, prompt_ids, max_new_tokens, temperature, top_k, tokenizer.token_to_id(stop), seed
    )
    continuation = tokenizer.decode(new_ids, skip_special_tokens=True)
    if chat:
        print(f"user: {prompt}\nassistant: {continuation.strip()}", flush=True)
    else:
        print(prompt + continuation, flush=True)
    return 0
