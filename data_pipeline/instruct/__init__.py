"""Instruction tuning data: the chat template, its checks, and the instruction-data loader."""
