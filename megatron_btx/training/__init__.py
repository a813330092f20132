"""megatron_btx.training"""
