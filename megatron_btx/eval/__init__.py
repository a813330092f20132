"""megatron_btx.eval"""
