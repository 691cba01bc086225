"""Validation loss, perplexity and bits per byte over a fixed set of validation batches.

The batches are drawn once at start-up from the validation split with a fixed seed and kept in
memory, so every evaluation (and every resumed run) scores exactly the same tokens. Each rank scores
its own batches; summed losses and token counts are all-reduced so the result is the mean over all
ranks' targets.

Bits per byte makes runs with different tokenizers comparable:
    bpb = (mean loss in nats per token) / ln 2 / (text bytes per token)
where bytes per token comes from the manifest's counts for the validation split.

With several data sources each source's own validation split has its own fixed batches (`ValSource`), scored
apart (`val/<source>/loss`, `val/<source>/bpb`); the mixed figure is then their combination by each source's
share of the validation split (manifest counts): val_loss = sum_s (tokens_s / tokens) * loss_s, and
val_bpb = sum_s (bytes_s / bytes) * bpb_s, which is val_loss / ln 2 / (bytes / tokens) of the whole split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from model.loss import IGNORE_INDEX
from train.batch import Batch, batch_loss, to_device


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: Optional[float]) -> Optional[float]:
    if not bytes_per_token or not math.isfinite(loss_nats_per_token):
        return None
    return loss_nats_per_token / math.log(2) / bytes_per_token


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: List[Batch], device: torch.device, bytes_per_token: Optional[float]
) -> Dict[str, Optional[float]]:
    """{"val_loss", "val_ppl", "val_bpb" (when bytes_per_token is known)} averaged over every rank's fixed batches (collective call)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, target count
    for batch in batches:
        batch = to_device(batch, device)
        loss = batch_loss(model, batch)
        n_targets = (batch["labels"] != IGNORE_INDEX).sum()
        totals[0] += loss.double() * n_targets  # a batch without targets (instruction data) adds nothing
        totals[1] += n_targets
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    if was_training:
        model.train()
    loss_sum, count = totals.tolist()
    val_loss = loss_sum / count if count else float("nan")
    result = {"val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss < 700 else float("inf")}
    val_bpb = bits_per_byte(val_loss, bytes_per_token)
    if val_bpb is not None:  # instruction data has no byte counts: no bits per byte, rather than a blank
        result["val_bpb"] = val_bpb
    return result


SOURCE_KEYS = ("val/{source}/loss", "val/{source}/bpb")
"""The eval row's keys of one source's validation loss (nats per token) and bits per byte."""


@dataclass(frozen=True)
class ValSource:
    """One data source's own validation split: this rank's fixed batches and the split's manifest counts."""

    name: str
    """The source's name in the manifest."""
    batches: List[Batch]
    """This rank's fixed validation batches drawn from this source only."""
    tokens: int
    """Validation tokens of the source (its weight in the mixed loss)."""
    text_bytes: int
    """Text bytes behind those tokens (its weight in the mixed bits per byte)."""


@torch.no_grad()
def evaluate_sources(
    model: torch.nn.Module, sources: List[ValSource], device: torch.device
) -> Dict[str, Optional[float]]:
    """Each source's loss and bits per byte, and the mixed val_loss/val_ppl/val_bpb weighted by each source's
    share of the validation split (collective call: every rank scores the sources in the same order)."""
    result: Dict[str, Optional[float]] = {}
    mixed, tokens, text_bytes = 0.0, 0, 0
    for source in sources:
        scores = evaluate(model, source.batches, device, source.text_bytes / source.tokens)
        loss_key, bpb_key = (key.format(source=source.name) for key in SOURCE_KEYS)
        result[loss_key], result[bpb_key] = scores["val_loss"], scores.get("val_bpb")
        mixed += source.tokens * scores["val_loss"]
        tokens, text_bytes = tokens + source.tokens, text_bytes + source.text_bytes
    val_loss = mixed / tokens
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss < 700 else float("inf"),
        "val_bpb": bits_per_byte(val_loss, text_bytes / tokens),
        **result,
    }
