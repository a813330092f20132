"""Conversion between HF and megatron-core checkpoints, from the command line."""
