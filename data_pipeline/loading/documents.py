"""Document masking for pretraining (`data.document_mask: true`), derived from the EOT tokens of a batch.

The token stream separates documents with EOT, so no loader or shard format change is needed: each EOT opens
a new document (it plays the part of a beginning-of-sequence token, as when `slm generate` starts from an
empty prompt), attention stays within a document and positions restart at 0 on every EOT. Tokens before the
first EOT of a window are the tail of a document cut by the window: they form document 0, positions from 0.
The targets need no change: the token before an EOT predicts that EOT inside its own document, and the EOT
predicts the first token of the document it opens.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import Tensor


def document_ids_from_eot(input_ids: Tensor, eot_id: int) -> Tuple[Tensor, Tensor]:
    """input_ids (B, T) -> (position_ids (B, T) restarting at each EOT, doc_ids (B, T) counting EOTs so far)."""
    starts = input_ids == eot_id  # (B, T): True where a document opens
    doc_ids = starts.long().cumsum(dim=1)  # (B, T)
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, T)
    last_start = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): latest opening at or before t
    return index - last_start, doc_ids


def add_document_ids(batch: Dict[str, Tensor], eot_id: int) -> Dict[str, Tensor]:
    """The batch with position_ids and doc_ids derived from its input_ids (what Transformer.forward takes)."""
    position_ids, doc_ids = document_ids_from_eot(batch["input_ids"], eot_id)
    return {**batch, "position_ids": position_ids, "doc_ids": doc_ids}


class DocumentMaskedLoader:
    """Wraps a pretraining loader so every batch carries document ids; everything else (state_dict, epoch,
    close, ...) is the wrapped loader's."""

    def __init__(self, loader: Any, eot_id: int) -> None:
        self.loader, self.eot_id = loader, eot_id

    def __iter__(self) -> Iterator[Dict[str, Tensor]]:
        self.iterator = iter(self.loader)
        return self

    def __next__(self) -> Dict[str, Tensor]:
        if not hasattr(self, "iterator"):
            self.iterator = iter(self.loader)
        return add_document_ids(next(self.iterator), self.eot_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def document_masked(train_loader: Any, val_batches: List[Dict[str, Tensor]], eot_id: int) -> tuple:
    """(train loader, validation batches), both with document ids: the trainer's one hook."""
    return DocumentMaskedLoader(train_loader, eot_id), [add_document_ids(b, eot_id) for b in val_batches]
