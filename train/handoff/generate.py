"""`slm generate MODEL --prompt TEXT`: decode from a checkpoint, run dir or Hugging Face export, in fp32 on CPU/GPU.

Plain mode continues the text and stops at <|endoftext|>; --chat wraps the prompt as one user turn of the ChatML
template (exactly as in instruction tuning) and stops at <|im_end|>. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Callable, List, Optional

import torch

from common.log import say
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
    on_token: Optional[Callable[[int], None]] = None,
) -> List[int]:
    """The new token ids after prompt_ids (the stop token itself left out); `on_token` sees each as it comes."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)

    def each(next_token: torch.Tensor) -> None:  # (1,)
        if on_token is not None and int(next_token[0]) != eos_id:
            on_token(int(next_token[0]))

    out = model.generate(
        tokens,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        eos_id=eos_id,
        generator=generator,
        on_token=each,
    )
    new = out[0, len(prompt_ids) :].tolist()
    return new[: new.index(eos_id)] if eos_id in new else new


class TextStream:
    """Prints decoded text as tokens arrive: the ids so far are decoded as a whole, and only the new complete
    characters are written (a byte-level token may end inside a UTF-8 character). `strip` (the chat answer)
    drops leading whitespace and holds trailing whitespace back, so the answer prints stripped."""

    def __init__(self, tokenizer: Any, strip: bool = False) -> None:
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.printed = 0
        self.strip = strip

    def ready(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return text.strip() if self.strip else text

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.ready()
        if text.endswith("\ufffd"):  # an unfinished character: wait for its next bytes
            return
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)

    def finish(self) -> None:
        sys.stdout.write(self.ready()[self.printed :] + "\n")
        sys.stdout.flush()


def generate_cli(
    model: str | os.PathLike,
    prompt: str,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    seed: int = 0,
) -> int:
    """Print the prompt and its continuation, streamed as it is decoded; returns the exit code.

    New tokens are capped at the model's context (model.max_seq_len): that bounds the time of any request, and
    a longer continuation would only slide the window past the prompt. Status lines go to stderr."""
    if not math.isfinite(temperature) or temperature < 0:
        raise TrainError(f"--temperature is {temperature}; expected 0 (greedy) or a positive number.")
    if max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens is {max_new_tokens}; expected a positive integer.")
    if top_k is not None and top_k < 1:
        raise TrainError(f"--top-k is {top_k}; expected a positive integer.")
    source = locate_weights(model)
    tokenizer = load_tokenizer(source.tokenizer_path)
    state_dict, cfg = load_weights(source)
    if max_new_tokens > cfg.max_seq_len:
        say(f"--max-new-tokens {max_new_tokens} capped at the model's context, {cfg.max_seq_len} tokens")
        max_new_tokens = cfg.max_seq_len
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = build_model(state_dict, cfg, torch.float32).to(device)
    if chat:
        prompt_ids = encode_chat_prompt([{"role": "user", "content": prompt}], tokenizer)
        stop = IM_END
        sys.stdout.write(f"user: {prompt}\nassistant: ")
    else:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [tokenizer.token_to_id(EOT)]
        stop = EOT
        sys.stdout.write(prompt)
    stream = TextStream(tokenizer, strip=chat)
    generate_ids(
        net,
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        tokenizer.token_to_id(stop),
        seed,
        on_token=stream,
    )
    stream.finish()
    return 0
