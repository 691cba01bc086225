"""Pretraining batches from the shards: the loader, its windows, their order, document masking."""
