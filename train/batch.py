"""The batch adapter between the loaders and the model, used by the step loop and by evaluation.

One vocabulary end to end: a batch is a dict of LongTensors named `input_ids` (B, T), `labels` (B, T; the
next token, IGNORE_INDEX where no loss counts) and, for packed instruction data and `data.document_mask`
pretraining only, `position_ids` and `doc_ids`. Both loaders (`data_pipeline.loading.loader`, `data_pipeline.instruct.data`) yield these names, and this module is
the only place that hands them to `Transformer.forward` (positionally, so the model's own argument names never
leak into the training code).
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, List

import torch

Batch = Dict[str, torch.Tensor]
OPTIONAL_KEYS = ("position_ids", "doc_ids")
"""Batch keys only packed instruction data (and document-masked pretraining) carries."""


def take_batches(loader: Iterable[Batch], n_batches: int) -> List[Batch]:
    """The first `n_batches` batches of `loader`, copied out so they never change."""
    return [{k: v.clone() for k, v in batch.items()} for batch in itertools.islice(iter(loader), n_batches)]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on `device` (input_ids, labels, and position/doc ids when packed)."""
    out = {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "labels": batch["labels"].to(device, non_blocking=True),
    }
    for key in OPTIONAL_KEYS:
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


def batch_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model's mean loss over the batch's labels (a batch already on the model's device)."""
    extra = {key: batch[key] for key in OPTIONAL_KEYS if key in batch}
    _, loss = model(batch["input_ids"], batch["labels"], **extra)
    return loss
