"""megatron_btx.pipeline"""
