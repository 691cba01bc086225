"""The chat template: ChatML conversations rendered as text and tokenized, with the labels of assistant-only loss.

The chat template (ChatML, with the tokenizer's reserved special tokens), for each message in order:

    <|im_start|>{role}\\n{content stripped of surrounding whitespace}<|im_end|>\\n

and, to prompt a reply, `<|im_start|>assistant\\n`. `CHAT_TEMPLATE` is the same thing as a Jinja string; the
Hugging Face export writes it into tokenizer_config.json, so `apply_chat_template` there gives our ids exactly.
The whole rendered text is tokenized in one call (as transformers does), never piece by piece, so the byte-level
BPE sees the same "\\n" after a role and between turns in training and in transformers.

Which tokens carry loss (`format_chat` labels): the tokens of each assistant message's content and the
`<|im_end|>` that closes it. Everything else is -100: system and user turns entirely, the `<|im_start|>`, the
role name and its "\\n" of assistant turns, and the "\\n" after every `<|im_end|>`. So the model learns to answer
and to stop, never to write the user's part. Content is stripped (Jinja `trim`) so no token straddles the
template/content boundary.

Instruction tuning (`data_pipeline.instruct.data`), the export (`tokenizer_config.json`) and `slm generate --chat` all
use this module, so the template exists once.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from tokenizers import Tokenizer

from data_pipeline.errors import DataError
from data_pipeline.instruct.checks import loss_labels
from data_pipeline.tokenizer import EOT, IM_END, IM_START, PAD

ROLES = ("system", "user", "assistant")
RESERVED = (IM_START, IM_END, EOT, PAD)
"""Special tokens only the template writes; data containing them is refused (no role injection)."""
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '" + IM_START + "' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- (message['content'] | trim) + '" + IM_END + "' -}}{%- endgeneration -%}"
    "{%- else -%}{{- (message['content'] | trim) + '" + IM_END + "' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
)
"""The ChatML template as Jinja, for tokenizer_config.json; `render_chat` is its Python twin (tested equal).
{% generation %} marks exactly our loss spans (assistant content + its <|im_end|>), so transformers'
return_assistant_tokens_mask, and TRL's assistant_only_loss, mask what train.stage=ift trains on."""

Message = Dict[str, str]


def render_chat(
    messages: Sequence[Message], add_generation_prompt: bool = False
) -> Tuple[str, List[Tuple[int, int]]]:
    """ChatML text of a conversation and the character spans that carry loss (assistant content + its <|im_end|>)."""
    parts: List[str] = []
    loss_spans: List[Tuple[int, int]] = []
    length = 0
    for message in messages:
        role, content = message["role"], message["content"].strip()
        for token in RESERVED:
            if token in content:
                raise DataError(
                    f"A {role} message contains the reserved token {token!r}; it may only come from the chat template."
                )
        head = f"{IM_START}{role}\n"
        parts += [head, content, f"{IM_END}\n"]
        start = length + len(head)
        if role == "assistant":
            loss_spans.append((start, start + len(content) + len(IM_END)))
        length = start + len(content) + len(IM_END) + 1
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), loss_spans


def format_chat(messages: Sequence[Message], tokenizer: Tokenizer) -> Tuple[List[int], List[int]]:
    """Token ids of a conversation and its labels: labels[i] = ids[i] where token i carries loss, else -100.

    Labels are aligned with ids (not shifted); the loader shifts them inside each example.
    """
    text, loss_spans = render_chat(messages)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return list(encoding.ids), loss_labels(encoding.ids, encoding.offsets, loss_spans)


def encode_chat_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> List[int]:
    """Ids of a conversation followed by the assistant generation prompt (for `slm generate --chat`)."""
    text, _ = render_chat(messages, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)
