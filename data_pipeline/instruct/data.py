"""Instruction data for train.stage=ift: ChatML conversations, assistant-only loss, packing, a resumable loader.

The chat template and its labels are `data_pipeline.instruct.chat`.

Three jsonl formats, detected per line: chat `{"messages": [{"role", "content"}, ...]}`;
`{"instruction", "input", "output"}` (input optional; appended to the instruction after a blank line);
self-instruct `{"instruction", "instances": [{"input", "output"}, ...]}`, one example per instance.

Sequences (`ift.packing`): with packing, several examples share a row of seq_len tokens (best fit, in a seeded
order); `doc_ids` keep attention inside each example and `position_ids` restart at 0, so the model computes
exactly what it would on each example alone. Without packing, each example gets its own row, right-padded with
`<|pad|>` (labels -100); causal attention never looks right, so padding changes nothing. Inputs and targets are
shifted inside each example, so no target crosses an example boundary. An example needs len(ids) - 1 <= seq_len
positions; longer ones are cut to their first seq_len + 1 tokens (`ift.overlong=truncate`) or left out (`drop`);
a truncated example left with no loss-bearing token is dropped too. Both are counted and printed.

The train/val split is by example, from a hash of its messages: deterministic, independent of seed and file order,
and duplicates always land on the same side.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from tokenizers import Tokenizer

from common.log import say
from data_pipeline.config import InstructConfig
from data_pipeline.errors import DataError
from data_pipeline.instruct.chat import RESERVED, ROLES, Message, format_chat
from data_pipeline.instruct.checks import check_role_order, check_some_answer, has_empty_answer
from data_pipeline.tokenizer import IM_END, IM_START, PAD, load_tokenizer
from model.loss import IGNORE_INDEX

REPO_ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------------------------- reading jsonl


def _text(record: Dict[str, Any], key: str, where: str, required: bool = True) -> str:
    """record[key] as a string; a missing optional field is ""."""
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'.")
        return ""
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field '{key}' is a {type(record[key]).__name__}; expected a string.")
    return record[key]


def _instruction_prompt(instruction: str, input_text: str) -> str:
    return f"{instruction.strip()}\n\n{input_text.strip()}" if input_text.strip() else instruction.strip()


def record_to_conversations(record: Any, where: str) -> List[List[Message]]:
    """One jsonl record in any of the three formats -> its conversations (several for self-instruct)."""
    conversations = _record_to_conversations(record, where)
    for conversation in conversations:
        for message in conversation:
            for token in RESERVED:
                if token in message["content"]:
                    raise DataError(
                        f"{where}: the {message['role']} message contains the reserved token {token!r}, "
                        "which only the chat template may write; remove it from the data."
                    )
    return conversations


def _record_to_conversations(record: Any, where: str) -> List[List[Message]]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got a {type(record).__name__}.")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(
                f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects."
            )
        conversation = []
        for j, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content'.")
            if message["role"] not in ROLES:
                raise DataError(
                    f"{where}: messages[{j}].role is {message['role']!r}; expected one of {', '.join(ROLES)}."
                )
            conversation.append(
                {"role": message["role"], "content": _text(message, "content", f"{where}: messages[{j}]")}
            )
        if not any(m["role"] == "assistant" for m in conversation):
            raise DataError(
                f"{where}: no assistant message, so no token would carry loss; expected at least one."
            )
        check_role_order(conversation, where)
        return [conversation]
    if "instances" in record:
        instruction = _text(record, "instruction", where)
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise DataError(
                f"{where}: field 'instances' must be a non-empty list of {{input, output}} objects."
            )
        conversations = []
        for j, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise DataError(f"{where}: instances[{j}] must be an object with 'input' and 'output'.")
            inner = f"{where}: instances[{j}]"
            prompt = _instruction_prompt(instruction, _text(instance, "input", inner, required=False))
            conversations.append(
                [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(instance, "output", inner)},
                ]
            )
        return conversations
    if "instruction" in record and "output" in record:
        prompt = _instruction_prompt(
            _text(record, "instruction", where), _text(record, "input", where, required=False)
        )
        return [
            [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(record, "output", where)},
            ]
        ]
    raise DataError(
        f"{where}: unrecognized record with keys {sorted(record)}; expected 'messages' (chat), "
        "'instruction' + 'output' (+ optional 'input'), or 'instruction' + 'instances' (self-instruct)."
    )


def resolve_path(path: str) -> Path:
    """A relative path from the working directory, else from the project root (where data/ ships)."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    return REPO_ROOT / candidate if (REPO_ROOT / candidate).is_file() else candidate


def read_conversations(path: str) -> List[List[Message]]:
    """Every conversation of one jsonl file; errors name the file and line."""
    file = resolve_path(path)
    if not file.is_file():
        raise DataError(
            f"Instruction data file '{path}' does not exist (config key ift.paths); expected a jsonl file."
        )
    conversations: List[List[Message]] = []
    with file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).") from None
            conversations.extend(record_to_conversations(record, where))
    if not conversations:
        raise DataError(f"Instruction data file '{file}' holds no examples.")
    check_some_answer(conversations, str(file))
    return conversations


def split_conversations(
    conversations: Sequence[List[Message]], split: str, val_fraction: float
) -> List[List[Message]]:
    """The train or val share, by a hash of each example's messages (at least one val example if val_fraction > 0)."""
    if split not in ("train", "val"):
        raise DataError(f"Unknown split {split!r}; expected train or val.")

    def position(conversation: List[Message]) -> float:
        digest = hashlib.sha256(json.dumps(conversation, sort_keys=True).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    positions = [position(c) for c in conversations]
    is_val = [p < val_fraction for p in positions]
    if val_fraction > 0 and not any(is_val) and len(conversations) > 1:
        is_val[min(range(len(positions)), key=positions.__getitem__)] = True
    chosen = [c for c, v in zip(conversations, is_val) if v == (split == "val")]
    if not chosen:
        raise DataError(
            f"The {split} split of the instruction data is empty ({len(conversations)} examples, "
            f"ift.val_fraction={val_fraction}); add examples or change ift.val_fraction."
        )
    return chosen


# ------------------------------------------------------------------------------------------- sequences (rows)


@dataclass
class InstructStats:
    """What became of the examples of one split; printed once and kept on the loader."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    padding: int = 0
    empty_answers: int = 0
    """Examples with an empty assistant answer (they still learn to stop)."""

    def summary(self, split: str, seq_len: int, packing: bool) -> str:
        kept = self.examples - self.dropped
        return (
            f"ift {split}: {self.examples} examples -> {self.rows} rows of {seq_len} tokens "
            f"({'packed' if packing else 'one example per row'}); {self.truncated} truncated and {self.dropped} "
            f"dropped as longer than seq_len + 1 (ift.overlong) or left without answer tokens; {kept} kept, "
            f"{self.loss_tokens} of {self.tokens} target tokens carry loss, "
            f"{self.padding / max(1, self.rows * seq_len):.0%} padding."
            + (
                f" WARNING: {self.truncated + self.dropped} of {self.examples} examples lost answer tokens or were "
                "dropped; raise model.max_seq_len."
                if self.truncated + self.dropped > self.examples / 4
                else ""
            )
        ) + (f" {self.empty_answers} example(s) have an empty answer." if self.empty_answers else "")


def special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise DataError(
            f"The tokenizer has no {token!r} token; instruction tuning needs {IM_START}, {IM_END} and {PAD}."
        )
    return token_id


def build_rows(
    examples: Sequence[Tuple[List[int], List[int]]],
    seq_len: int,
    packing: bool,
    overlong: str,
    pad_id: int,
    seed: int,
) -> Tuple[torch.Tensor, InstructStats]:
    """Examples (ids, labels) -> rows (N, 4, seq_len): input_ids, labels (shifted), position_ids, doc_ids."""
    stats = InstructStats(examples=len(examples))
    pieces: List[Tuple[List[int], List[int]]] = []  # (inputs, targets), shifted inside the example
    for ids, labels in examples:
        if len(ids) - 1 > seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, labels = ids[: seq_len + 1], labels[: seq_len + 1]
        targets = labels[1:]
        if all(t == IGNORE_INDEX for t in targets):
            stats.dropped += 1
            continue
        pieces.append((ids[:-1], targets))
        stats.tokens += len(targets)
        stats.loss_tokens += sum(t != IGNORE_INDEX for t in targets)
    if not pieces:
        raise DataError(
            f"No instruction example fits a sequence of {seq_len} tokens (ift.overlong={overlong})."
        )
    random.Random(seed).shuffle(pieces)
    rows: List[List[int]] = []  # indices into pieces, per row
    if packing:  # best fit: each piece goes to the open row with the least room that still fits it
        free: List[Tuple[int, int]] = []  # sorted (room left, row index)
        for p, (inputs, _) in enumerate(pieces):
            at = bisect.bisect_left(free, (len(inputs), -1))
            if at < len(free):
                room, row = free.pop(at)
                rows[row].append(p)
            else:
                room, row = seq_len, len(rows)
                rows.append([p])
            if room - len(inputs) > 0:
                bisect.insort(free, (room - len(inputs), row))
    else:
        rows = [[p] for p in range(len(pieces))]
    data = torch.empty(len(rows), 4, seq_len, dtype=torch.long)
    for r, members in enumerate(rows):
        input_ids, targets, positions, docs = [], [], [], []
        for doc, p in enumerate(members):
            inputs, labels = pieces[p]
            input_ids += inputs
            targets += labels
            positions += range(len(inputs))
            docs += [doc] * len(inputs)
        pad = seq_len - len(input_ids)
        stats.padding += pad
        data[r, 0] = torch.tensor(input_ids + [pad_id] * pad)
        data[r, 1] = torch.tensor(targets + [IGNORE_INDEX] * pad)
        data[r, 2] = torch.tensor(positions + list(range(pad)))
        data[r, 3] = torch.tensor(docs + [len(members)] * pad)
    stats.rows = len(rows)
    return data, stats


# ------------------------------------------------------------------------------------------------------ loader


class InstructLoader:
    """Infinite iterator of micro-batches over fixed rows, reshuffled each epoch.

    A global cursor counts rows consumed by all ranks together; batch k of rank r holds global samples
    cursor + r * B ... cursor + (r + 1) * B - 1. So `state_dict()` resumes exactly, also on another world size.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        stats: InstructStats,
        packing: bool,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}.")
        self.rows, self.stats, self.packing = rows, stats, packing
        self.micro_batch_size, self.rank, self.world_size, self.seed = (
            micro_batch_size,
            rank,
            world_size,
            seed,
        )
        self.cursor = 0
        """Rows consumed so far by all ranks together."""
        self.fingerprint = hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _row(self, sample: int) -> torch.Tensor:
        epoch, index = divmod(sample, len(self.rows))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.rows), generator=generator)
        return self.rows[self._order[index]]

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        first = self.cursor + self.rank * self.micro_batch_size
        batch = torch.stack([self._row(first + i) for i in range(self.micro_batch_size)])  # (B, 4, T)
        self.cursor += self.micro_batch_size * self.world_size
        out = {"input_ids": batch[:, 0].clone(), "labels": batch[:, 1].clone()}
        if self.packing:
            out["position_ids"], out["doc_ids"] = batch[:, 2].clone(), batch[:, 3].clone()
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {
            "cursor": self.cursor,
            "seed": self.seed,
            "rows": len(self.rows),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != self.seed:
            raise DataError(
                f"The instruction loader state was saved for other data or another seed (fingerprint "
                f"{state.get('fingerprint')}, seed {state.get('seed')}; now {self.fingerprint}, seed {self.seed}): "
                "the ift files, tokenizer, seq_len or packing changed, so the run cannot resume exactly."
            )
        self.cursor = int(state["cursor"])


def build_instruct_loader(
    ift_cfg: InstructConfig,
    tokenizer: Tokenizer | str | Path,
    split: str,
    seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
) -> InstructLoader:
    """The IFT counterpart of `data_pipeline.loading.loader.build_loader`: same batches, plus position_ids/doc_ids when packing."""
    try:
        ift_cfg.validate()
    except ValueError as err:
        raise DataError(str(err)) from None
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    for token in (IM_START, IM_END):
        special_id(tokenizer, token)
    pad_id = special_id(tokenizer, PAD)
    conversations: List[List[Message]] = []
    for path in ift_cfg.paths:
        conversations.extend(read_conversations(path))
    chosen = split_conversations(conversations, split, ift_cfg.val_fraction)
    examples = [format_chat(c, tokenizer) for c in chosen]
    rows, stats = build_rows(examples, seq_len, ift_cfg.packing, ift_cfg.overlong, pad_id, seed)
    stats.empty_answers = sum(has_empty_answer(c) for c in chosen)
    say(stats.summary(split, seq_len, ift_cfg.packing), rank == 0)
    return InstructLoader(rows, stats, ift_cfg.packing, micro_batch_size, rank, world_size, seed)
