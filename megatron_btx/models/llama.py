"""Llama hyper-parameters -> megatron-core TransformerConfig and GPTModel (dense or MoE).

`LlamaArgs` carries the fields of an HF `LlamaConfig` (and `MixtralConfig` for MoE), plus the
attention extras of the other Llama-architecture families (Qwen2's q/k/v biases, Qwen3's QK-norm),
so the HF config.json is the one description of a model that every stage shares
(:mod:`megatron_btx.checkpoint.families` reads and writes it for every family).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megatron_btx.errors import BTXError
from megatron_btx.models.arg_checks import check_llama_fields

log = logging.getLogger(__name__)

#: Vocabulary is padded to a multiple of this, independent of TP, so one checkpoint loads at
#: every TP size (TP must divide it).
VOCAB_PAD_MULTIPLE = 128


@dataclass
class LlamaArgs:
    """The fields of an HF LlamaConfig that define the function (plus MoE fields and the
    attention extras of the other families)."""

    #: the family of the attention and norms (the seed's HF model_type): llama | mistral |
    #: qwen2 | qwen3; an imported MoE keeps its attention's (mixtral -> mistral, qwen2_moe ->
    #: qwen2, qwen3_moe -> qwen3). Sources of different families never merge.
    model_type: str = "llama"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # MoE (HF Mixtral naming). num_local_experts == 0 means dense.
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    #: q/k/v projections with biases (Qwen2, Qwen2-MoE)
    qkv_bias: bool = False
    #: RMSNorm of every query and key head before RoPE (Qwen3, Qwen3-MoE)
    qk_norm: bool = False
    #: HF sliding_window, kept to be written back: null, or at least max_position_embeddings
    #: (a shorter window is refused: it has no exact form here)
    sliding_window: int | None = None
    #: MoE: the top-k softmax probabilities renormalised to sum to 1 (Mixtral, Qwen with
    #: norm_topk_prob: true; megatron-core's softmax over the top-k logits) or not (softmax
    #: over all experts, then top-k: megatron-core's pre-softmax router)
    norm_topk_prob: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_llama_fields(self)  # types and ranges first: one line naming a bad field
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise BTXError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise BTXError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        families = ("llama", "mistral", "qwen2", "qwen3")
        if self.model_type not in families:
            raise BTXError(
                f"model_type {self.model_type!r} is not a supported attention family "
                f"({', '.join(families)})"
            )
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            raise BTXError(
                f"sliding_window {self.sliding_window} is shorter than max_position_embeddings "
                f"{self.max_position_embeddings}; sliding-window attention is not supported"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind in (None, "default"):
                self.rope_scaling = None
            elif kind != "llama3":
                raise BTXError(
                    f"rope_scaling type {kind!r} is not supported (supported: llama3, none)"
                )

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE)

    def num_params(self, active: bool = False) -> int:
        """Parameter count (active=True: per token, counting top-k experts only)."""
        h, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        qkv = h * self.head_dim * (self.num_attention_heads + 2 * self.num_key_value_heads)
        proj = self.num_attention_heads * self.head_dim * h
        ffn = 3 * h * f
        n_exp = 1
        if self.is_moe:
            n_exp = self.num_experts_per_tok if active else self.num_local_experts
        router = h * self.num_local_experts if self.is_moe else 0
        extras = qkv // h if self.qkv_bias else 0
        extras += 2 * self.head_dim if self.qk_norm else 0
        per_layer = qkv + proj + n_exp * ffn + router + 2 * h + extras
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaArgs":
        return cls(**d)


@dataclass
class MoEOptions:
    """megatron-core MoE settings beyond the Llama fields."""

    dispatcher: str = "alltoall"  # alltoall | allgather
    aux_loss_coeff: float = 0.01
    load_balancing: str = "aux_loss"  # aux_loss | none | sinkhorn | seq_aux_loss
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    router_dtype: str | None = "fp32"


@dataclass(frozen=True)
class MoEVariant:
    """A merged MoE's shape beyond Mixtral's, as a checkpoint manifest's ``moe`` entry records it
    (and megatron-core's TransformerConfig needs it): the seed's FFN as a shared expert, and MoE
    in only some layers with a dense FFN in the others. An imported Qwen2-MoE's shared expert
    keeps its sigmoid gate (``shared_expert_gate``); a merge's is ungated. A BAM merge keeps
    the sources' attention blocks as attention experts (``attention_experts``, every layer)."""

    shared_expert_intermediate_size: int | None = None
    #: per layer: 1 = MoE, 0 = dense; None = every layer is MoE
    layer_freq: tuple[int, ...] | None = None
    #: FFN width of the dense layers (with layer_freq)
    dense_ffn_hidden_size: int | None = None
    #: the shared expert's output is scaled by sigmoid(gate_weight . x) (HF Qwen2-MoE)
    shared_expert_gate: bool = False
    #: attention experts per layer (BAM; models.attention_experts): 0 = one attention block
    attention_experts: int = 0
    #: the attention experts share their key/value projection (`experts_shared_kv`)
    attention_shared_kv: bool = False

    @classmethod
    def from_manifest(cls, entry: dict[str, Any] | None) -> MoEVariant:
        entry = entry or {}
        freq = entry.get("layer_freq")
        return cls(
            shared_expert_intermediate_size=entry.get("shared_expert_intermediate_size") or None,
            layer_freq=tuple(int(x) for x in freq) if freq else None,
            dense_ffn_hidden_size=entry.get("dense_ffn_hidden_size") if freq else None,
            shared_expert_gate=bool(entry.get("shared_expert_gate", False)),
            attention_experts=int(entry.get("attention_experts") or 0),
            attention_shared_kv=bool(entry.get("attention_shared_kv", False)),
        )

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "layer_freq": list(self.layer_freq) if self.layer_freq is not None else None,
            "dense_ffn_hidden_size": self.dense_ffn_hidden_size,
            "shared_expert_gate": self.shared_expert_gate,
        }
        if self.attention_experts:
            out["attention_experts"] = self.attention_experts
            out["attention_shared_kv"] = self.attention_shared_kv
        return out

    def __post_init__(self) -> None:
        n = self.attention_experts
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise BTXError(
                f"moe.attention_experts={n!r}: 0 (one attention block) or the number of "
                f"attention experts"
            )
        if self.attention_shared_kv and not n:
            raise BTXError("moe.attention_shared_kv needs attention experts")

    @property
    def is_plain(self) -> bool:
        """A Mixtral-shaped MoE (or a dense model): nothing beyond LlamaArgs."""
        return (
            self.shared_expert_intermediate_size is None
            and self.layer_freq is None
            and not self.attention_experts
        )

    @property
    def attention(self) -> str:
        """The merge's name of the attention: average | experts | experts_shared_kv."""
        if not self.attention_experts:
            return "average"
        return "experts_shared_kv" if self.attention_shared_kv else "experts"

    def attention_weights(self, args: LlamaArgs) -> list[tuple[str, tuple[int, ...]]]:
        """A layer's attention projection weights, by name under ``self_attention.`` in a
        checkpoint, with their global shapes (attention experts stacked on a first axis)."""
        h, d = args.hidden_size, args.head_dim
        heads, groups = args.num_attention_heads, args.num_key_value_heads
        proj = (h, heads * d)
        if not self.attention_experts:
            return [("linear_qkv", ((heads + 2 * groups) * d, h)), ("linear_proj", proj)]
        n = self.attention_experts
        if not self.attention_shared_kv:
            qkv = (n, (heads + 2 * groups) * d, h)
            return [("experts.linear_qkv", qkv), ("experts.linear_proj", (n, *proj))]
        return [
            ("linear_kv", (2 * groups * d, h)),
            ("experts.linear_q", (n, heads * d, h)),
            ("experts.linear_proj", (n, *proj)),
        ]

    def is_moe_layer(self, layer: int) -> bool:
        return self.layer_freq is None or bool(self.layer_freq[layer])

    def config_overrides(self) -> dict[str, Any]:
        """TransformerConfig fields beyond what LlamaArgs gives."""
        overrides: dict[str, Any] = {}
        if self.shared_expert_intermediate_size:
            overrides["moe_shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
            overrides["moe_shared_expert_gate"] = self.shared_expert_gate
        if self.layer_freq is not None:
            overrides["moe_layer_freq"] = list(self.layer_freq)
            overrides["ffn_hidden_size"] = self.dense_ffn_hidden_size
        if self.attention_experts:
            overrides["attention_experts"] = self.attention_experts
            overrides["attention_shared_kv"] = self.attention_shared_kv
        return overrides


def check_parallel(args: LlamaArgs, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """Refuse layouts that cannot shard this model, naming the size at fault."""
    if args.num_attention_heads % tp:
        raise BTXError(
            f"TP={tp} does not divide num_attention_heads={args.num_attention_heads}; "
            f"choose a TP that divides the heads"
        )
    if args.num_key_value_heads % tp:
        raise BTXError(
            f"TP={tp} does not divide num_key_value_heads={args.num_key_value_heads}; "
            f"choose a TP that divides the key-value heads"
        )
    if args.intermediate_size % tp:
        raise BTXError(f"TP={tp} does not divide intermediate_size={args.intermediate_size}")
    if args.padded_vocab_size % tp:
        raise BTXError(f"TP={tp} does not divide the padded vocabulary {args.padded_vocab_size}")
    if args.num_hidden_layers % pp:
        raise BTXError(
            f"PP={pp} does not divide num_hidden_layers={args.num_hidden_layers}; "
            f"choose a PP that divides the layers"
        )
    if ep > 1 and (not args.is_moe or args.num_local_experts % ep):
        raise BTXError(
            f"EP={ep} needs an MoE whose expert count is a multiple of EP "
            f"(num_local_experts={args.num_local_experts})"
        )


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)
    if key not in _DTYPES:
        raise BTXError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return _DTYPES[key]


def transformer_config(
    args: LlamaArgs,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    dtype: str | torch.dtype = "fp32",
    moe: MoEOptions | None = None,
    fused: bool | None = None,
    recompute: bool = False,
    cpu_init: bool = True,
    init_method_std: float = 0.02,
    perform_initialization: bool = True,
    variant: MoEVariant | None = None,
    **overrides: Any,
):
    """A megatron-core TransformerConfig equal in function to the HF Llama/Mixtral config (plus
    a merge `variant`'s fields; `overrides` last)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_btx.models.specs import fused_kernels_available

    check_parallel(args, tp, pp, ep)
    dt = to_dtype(dtype)
    fused = fused_kernels_available() if fused is None else fused
    moe = moe or MoEOptions()
    kw: dict[str, Any] = dict(
        num_layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_key_value_heads,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        qk_layernorm=args.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp if etp is not None else tp,
        sequence_parallel=tp > 1 and (args.is_moe or overrides.pop("sequence_parallel", False)),
        params_dtype=dt,
        bf16=dt == torch.bfloat16,
        fp16=dt == torch.float16,
        pipeline_dtype=dt,
        use_cpu_initialization=cpu_init,
        perform_initialization=perform_initialization,
        init_method_std=init_method_std,
        attention_softmax_in_fp32=True,
        apply_rope_fusion=False,
        masked_softmax_fusion=fused,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )
    if args.is_moe:
        kw.update(
            num_moe_experts=args.num_local_experts,
            moe_ffn_hidden_size=args.intermediate_size,
            moe_router_topk=args.num_experts_per_tok,
            moe_token_dispatcher_type=moe.dispatcher,
            moe_router_load_balancing_type=moe.load_balancing,
            # sinkhorn balances without a loss (megatron-core asserts its coefficient is 0)
            moe_aux_loss_coeff=moe.aux_loss_coeff
            if moe.load_balancing in ("aux_loss", "seq_aux_loss")
            else 0.0,
            moe_grouped_gemm=False,
            # renormalised top-k = softmax over the top-k logits; otherwise softmax, then top-k
            moe_router_pre_softmax=not args.norm_topk_prob,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_token_drop_policy=moe.drop_policy,
            moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
            moe_router_dtype=moe.router_dtype,
            moe_permute_fusion=False,
        )
    if variant is not None:
        kw.update(variant.config_overrides())
    kw.update(overrides)
    if kw.get("attention_experts"):
        from megatron_btx.models.attention_experts import AttentionExpertsConfig

        return AttentionExpertsConfig(**kw)
    return TransformerConfig(**kw)


def llama3_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling, for any low/high/original values."""
    dim = args.head_dim
    # explicit CPU device: also right inside a `with torch.device("meta")` model build
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (args.rope_theta ** (steps / dim))
    s = args.rope_scaling
    if not s:
        return inv
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, out)


def build_model(
    args: LlamaArgs,
    config=None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    spec: str | None = None,
    meta: bool = False,
    speed=None,
    **config_kwargs: Any,
):
    """The one megatron-core GPTModel builder (training, conversion, merge and evaluation).

    Builds this rank's pipeline stage (call after runtime.init) for a dense Llama, a Mixtral-shaped
    MoE or any merge variant (``variant=MoEVariant(...)`` among ``config_kwargs``, or a `config`
    made with it). ``meta=True`` builds on the `meta` device: shapes and the sharded state dict
    without storage, which is how the streaming writers learn every checkpoint key.
    `speed`: a models.speedups.SpeedOptions (experts module, dispatcher, kernels)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from megatron_btx import runtime
    from megatron_btx.models.specs import decoder_spec

    if config is None:
        config = transformer_config(args, **config_kwargs)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    rotary_base = args.rope_theta
    with runtime.meta_device() if meta else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_spec(config, spec, speed),
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=args.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(rotary_base) if float(rotary_base).is_integer() else rotary_base,
            rotary_percent=1.0,
            vp_stage=vp_stage,
        )
    if meta and {p.device.type for p in model.parameters()} != {"meta"}:
        log.warning("a model built on the meta device holds real storage; it costs memory")
    from megatron_btx.models.speedups import after_build

    after_build(model, speed)
    if not config.perform_initialization:
        _mark_tensor_parallel(model)
    if args.rope_scaling:
        rope = model.rotary_pos_emb
        rope.inv_freq = llama3_inv_freq(args).to(rope.inv_freq.device, rope.inv_freq.dtype)
    return model


def build_for_checkpoint(
    args: LlamaArgs,
    dtype: str | torch.dtype = "fp32",
    variant: MoEVariant | None = None,
    meta: bool = False,
    **kw: Any,
):
    """The model a checkpoint is read into or written from by the single-process tools
    (conversion, merge, verification, evaluation): megatron-core's local spec, no fused
    kernels, no initialisation (its weights are about to be loaded)."""
    kw.setdefault("spec", "local")
    kw.setdefault("fused", False)
    return build_model(
        args, dtype=dtype, variant=variant, meta=meta, perform_initialization=False, **kw
    )


def _mark_tensor_parallel(model: torch.nn.Module) -> None:
    """megatron-core sets the `tensor_model_parallel` attributes of a sharded weight only inside
    its initialisers, so a model built with perform_initialization=False (to be loaded from a
    checkpoint) lacks them, and the grad norm then skips every sharded weight on TP ranks > 0.
    Set them as the initialisers would."""
    from megatron.core import tensor_parallel as tpl

    dims = (
        (tpl.ColumnParallelLinear, 0),
        (tpl.RowParallelLinear, 1),
        (tpl.VocabParallelEmbedding, 0),
    )
    for mod in model.modules():
        for cls, dim in dims:
            w = getattr(mod, "weight", None)
            if (
                isinstance(mod, cls)
                and w is not None
                and not getattr(w, "tensor_model_parallel", False)
            ):
                tpl.set_tensor_model_parallel_attributes(w, True, dim, 1)
