"""Log-likelihood of continuations given contexts, for any causal LM module whose forward returns logits first.

Tokenization follows lm-evaluation-harness (`_encode_pair`): trailing whitespace of the context moves to the
continuation, the whole string is encoded and the continuation is what follows the context's tokens (so a
token that spans the boundary counts as continuation). Inputs longer than the model's window keep their last
max_len + 1 tokens, as the harness does.

Batching: the choices of one example share their context, so they are scored side by side in the same forward
pass, and examples of similar length go together (longest first). Rows are right-padded; with causal
attention a real token never sees the padding after it, so no attention mask is needed and only the
continuation positions are read. log_softmax runs in float32 on those positions alone.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from tokenizers import Tokenizer

Pair = Tuple[List[int], List[int]]
"""(context token ids, continuation token ids)."""
Score = Tuple[float, bool]
"""(summed log-likelihood of the continuation, whether every continuation token is the argmax)."""


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[Tuple[str, str]], prefix_id: int) -> List[Pair]:
    """Token ids of each (context, continuation) exactly as the harness's HFLM encodes them."""
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    whole = tokenizer.encode_batch([c + x for c, x in moved], add_special_tokens=False)
    heads = tokenizer.encode_batch([c for c, _ in moved], add_special_tokens=False)
    out = []
    for (context, continuation), whole_enc, head_enc in zip(moved, whole, heads):
        if not context:  # the harness conditions on a prefix token (EOT) when there is no context
            out.append(([prefix_id], tokenizer.encode(continuation, add_special_tokens=False).ids))
        else:
            out.append((head_enc.ids, whole_enc.ids[len(head_enc.ids) :]))
    return out


def model_window(pair: Pair, max_len: int) -> Tuple[List[int], int]:
    """(input ids, number of continuation tokens): the last max_len + 1 tokens, minus the final one."""
    context, continuation = pair
    if not continuation:
        raise ValueError("A continuation encodes to no tokens; nothing to score.")
    if len(continuation) > max_len:
        raise ValueError(
            f"A continuation of {len(continuation)} tokens does not fit the model's {max_len}-token window."
        )
    return (context + continuation)[-(max_len + 1) :][:-1], len(continuation)


def plan_batches(
    groups: Sequence[Sequence[Pair]], batch_size: int, max_len: int
) -> List[List[Tuple[int, int]]]:
    """Batches of (group, choice) keys: groups longest first, a group's choices kept together when they fit."""
    lengths = [max(len(c) + len(x) for c, x in group) for group in groups]
    order = sorted(range(len(groups)), key=lambda g: (-min(lengths[g], max_len + 1), g))
    batches: List[List[Tuple[int, int]]] = [[]]
    for g in order:
        keys = [(g, k) for k in range(len(groups[g]))]
        if batches[-1] and len(batches[-1]) + len(keys) > batch_size:
            batches.append([])
        for key in keys:
            if len(batches[-1]) == batch_size:
                batches.append([])
            batches[-1].append(key)
    return [batch for batch in batches if batch]


@torch.no_grad()
def forward_scores(
    model: torch.nn.Module,
    windows: Sequence[Tuple[List[int], int]],
    targets: Sequence[List[int]],
    device: torch.device,
) -> List[Score]:
    """One padded forward pass over these windows; the score of each window's continuation."""
    width = max(len(ids) for ids, _ in windows)
    tokens = torch.zeros(len(windows), width, dtype=torch.long)
    rows, cols, target_ids, owner = [], [], [], []
    for row, ((ids, n_cont), target) in enumerate(zip(windows, targets)):
        tokens[row, : len(ids)] = torch.tensor(ids)
        start = len(ids) - n_cont  # logits at position p predict token p + 1
        rows += [row] * n_cont
        cols += range(start, len(ids))
        target_ids += target
        owner += [row] * n_cont
    output = model(tokens.to(device))
    logits = output[0] if isinstance(output, (tuple, list)) else output
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    picked = torch.log_softmax(logits[index].float(), dim=-1)  # (continuation tokens, vocab)
    target_t = torch.tensor(target_ids, device=device)
    token_ll = picked.gather(1, target_t[:, None]).squeeze(1)
    greedy = picked.argmax(dim=-1) == target_t
    owner_t = torch.tensor(owner, device=device)
    sums = torch.zeros(len(windows), dtype=torch.float64, device=device).index_add_(
        0, owner_t, token_ll.double()
    )
    misses = torch.zeros(len(windows), dtype=torch.long, device=device).index_add_(
        0, owner_t, (~greedy).long()
    )
    return [(float(s), int(m) == 0) for s, m in zip(sums.tolist(), misses.tolist())]


def score_groups(
    model: torch.nn.Module,
    groups: Sequence[Sequence[Pair]],
    batch_size: int,
    max_len: int,
    device: torch.device,
    min_forwards: int = 0,
) -> List[List[Score]]:
    """Scores of every pair, grouped like the input. Runs at least `min_forwards` forward passes (extra ones on a
    one-token dummy), so that ranks holding fewer examples still join every pass of a ZeRO-3 model."""
    batches = plan_batches(groups, batch_size, max_len)
    scores: List[List[Optional[Score]]] = [[None] * len(group) for group in groups]
    for batch in batches:
        windows = [model_window(groups[g][k], max_len) for g, k in batch]
        targets = [groups[g][k][1][-n:] for (g, k), (_, n) in zip(batch, windows)]
        for (g, k), score in zip(batch, forward_scores(model, windows, targets, device)):
            scores[g][k] = score
    for _ in range(len(batches), min_forwards):
        forward_scores(model, [([0], 1)], [[0]], device)
    return scores  # type: ignore[return-value]


def count_forwards(groups: Sequence[Sequence[Pair]], batch_size: int, max_len: int) -> int:
    """How many forward passes score_groups will make for these groups."""
    return len(plan_batches(groups, batch_size, max_len))
