"""Tiny HF models of every supported family, made by `transformers` in the test, and helpers to
compare them with megatron-core (shared by test_families.py, test_moe_export.py and
test_moe_import.py).

Every model's RMSNorm weights and biases are randomised: `transformers` initialises norms to 1 and
biases to 0, which would hide a swapped q/k norm or a bias in the wrong rows."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import LLAMA_KW

V = LLAMA_KW["vocab_size"]

#: per family: (config class, model class, config fields beyond LLAMA_KW)
FAMILIES = {
    # Qwen2.5-0.5B's shape: q/k/v biases, tied embeddings, a large RoPE base
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    # Qwen3: QK-norm and a head_dim apart from hidden / heads (24 * 4 = 96 != 64)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    # Mistral v0.2+: no sliding window
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2},
    ),
    # Qwen1.5-MoE's shape: a gated shared expert, top-k not renormalised; plus a dense layer
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_hidden_layers": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 80,
            "mlp_only_layers": [0],
            "norm_topk_prob": False,
        },
    ),
    # Qwen3-MoE's shape: QK-norm, renormalised top-k, a head_dim of its own
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_hidden_layers": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "head_dim": 24,
        },
    ),
}


def make_hf(
    family: str, path: Path, seed: int = 0, dtype=torch.float32, base: Path | None = None, **kw
) -> Path:
    """A random HF model of `family` saved by transformers at `path`. With `base`, every tensor
    outside the MLP is copied from that checkpoint (a BTX branch of one seed)."""
    import transformers

    config_cls, model_cls, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**LLAMA_KW, **fields, **kw})
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
            elif "router" in name or name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)  # routing far from uniform
        if base is not None:
            from safetensors.torch import load_file

            ref = load_file(str(base / "model.safetensors"))
            for name, param in model.state_dict().items():
                if ".mlp." not in name and name in ref:
                    param.copy_(ref[name])
    model.to(dtype).save_pretrained(path)
    return path


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


class Runtime:
    """megatron_btx.runtime for one process, torn down on exit."""

    def __enter__(self):
        from megatron_btx import runtime

        runtime.init(device="cpu")

    def __exit__(self, *exc):
        from megatron_btx import runtime

        runtime.teardown()


def megatron_model(ckpt: Path, router: dict | None = None):
    """A torch_dist checkpoint loaded into megatron-core as its manifest describes (args, merge
    variant), with a BTX router installed when asked (call inside Runtime)."""
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, read_variant
    from megatron_btx.models.llama import build_for_checkpoint

    args = read_args(ckpt)
    overrides = {}
    if router is not None:
        from megatron_btx.models import routers

        overrides = routers.config_overrides(router, num_experts=args.num_local_experts)
    model = build_for_checkpoint(args, torch.float32, read_variant(ckpt), **overrides)
    load_model(model, ckpt)
    if router is not None:
        routers.install(model, router)
    return model.eval()


def megatron_logits(model, ids: torch.Tensor, vocab: int = V) -> torch.Tensor:
    """Logits over the real vocabulary (the padded rows dropped)."""
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        return model(ids, pos, None)[..., :vocab]


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from megatron_btx.checkpoint.hf import HFReader

    reader = HFReader(folder)
    return {k: reader.get(k) for k in reader.keys()}


def assert_bytes_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
