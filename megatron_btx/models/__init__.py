"""megatron_btx.models"""
