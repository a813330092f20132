"""megatron_btx.checkpoint"""
