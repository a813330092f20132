"""HF Llama: the family every other here extends (its tensor names and its config.json)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_btx.checkpoint.families.base import Family, register
from megatron_btx.checkpoint.families.config import to_hf
from megatron_btx.checkpoint.mapping import (
    EMB,
    FC1,
    FC2,
    FINAL_LN,
    IGNORED_HF_SUFFIXES,
    K_NORM,
    LN1,
    LN2,
    OUT,
    PROJ,
    Q_NORM,
    QKV,
    QKV_BIAS,
    pad_vocab,
    qkv_bias_from_mcore,
    qkv_bias_to_mcore,
    qkv_from_mcore,
    qkv_to_mcore,
    split_fc1,
)
from megatron_btx.errors import BTXError
from megatron_btx.models.llama import LlamaArgs, MoEVariant
from megatron_btx.models.router_types import HFRouting


class LlamaAdapter:
    """HF Llama <-> megatron-core names and layouts, the base of every family's adapter (the
    others override the class attributes, the attention extras and the FFN part). Roles name a
    layer's HF tensors: ln1, q, k, v, (q_bias, k_bias, v_bias), (q_norm, k_norm), o, ln2, then
    the FFN's (gate, up, down for a dense SwiGLU)."""

    family = "llama"
    #: HF names of the global tensors, by megatron name
    GLOBALS = {
        EMB: "model.embed_tokens.weight",
        FINAL_LN: "model.norm.weight",
        OUT: "lm_head.weight",
    }
    #: the HF family stores q/k/v biases (zeros are written for a model without them)
    HF_QKV_BIAS = False
    #: the HF family normalises query and key heads (it cannot be left out: RMSNorm is not the
    #: identity whatever its weight)
    HF_QK_NORM = False

    def __init__(
        self,
        args: LlamaArgs,
        variant: MoEVariant | None = None,
        routing: HFRouting | None = None,
        hf_qkv_bias: bool | None = None,
    ):
        self.args = args
        self.variant = variant or MoEVariant()
        self.routing = routing
        self.hf_qkv_bias = self.HF_QKV_BIAS if hf_qkv_bias is None else hf_qkv_bias
        if args.qkv_bias and not self.hf_qkv_bias:
            raise BTXError(f"HF {self.family} has no q/k/v biases; this model has them")
        if args.qk_norm != self.HF_QK_NORM:
            theirs = "has" if self.HF_QK_NORM else "has no"
            ours = "has" if args.qk_norm else "has none"
            raise BTXError(f"HF {self.family} {theirs} QK-norm; this model {ours}")

    def hf_config(self) -> dict:
        """The config.json of this family for the model."""
        return to_hf(self.args, self.variant, self.routing, self.family)

    # ---- names and shapes ---------------------------------------------------------------
    def global_names(self) -> dict[str, str]:
        """{megatron name: HF name} of the global tensors (no output layer when tied)."""
        names = dict(self.GLOBALS)
        if self.args.tie_word_embeddings:
            names.pop(OUT)
        return names

    def layer_names(self, layer: int) -> dict[str, str]:
        """HF names of layer `layer`'s tensors, by role."""
        prefix = f"model.layers.{layer}."
        names = {
            "ln1": prefix + "input_layernorm.weight",
            "q": prefix + "self_attn.q_proj.weight",
            "k": prefix + "self_attn.k_proj.weight",
            "v": prefix + "self_attn.v_proj.weight",
        }
        if self.hf_qkv_bias:
            for role in ("q", "k", "v"):
                names[f"{role}_bias"] = prefix + f"self_attn.{role}_proj.bias"
        if self.HF_QK_NORM:
            names["q_norm"] = prefix + "self_attn.q_norm.weight"
            names["k_norm"] = prefix + "self_attn.k_norm.weight"
        names["o"] = prefix + "self_attn.o_proj.weight"
        names["ln2"] = prefix + "post_attention_layernorm.weight"
        names.update(self.ffn_names(prefix, layer))
        return names

    def ffn_names(self, prefix: str, layer: int) -> dict[str, str]:
        return {
            "gate": prefix + "mlp.gate_proj.weight",
            "up": prefix + "mlp.up_proj.weight",
            "down": prefix + "mlp.down_proj.weight",
        }

    def layer_shapes(self, layer: int) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of layer `layer`'s tensors, in export order."""
        args = self.args
        hidden = args.hidden_size
        q_rows = args.num_attention_heads * args.head_dim
        kv_rows = args.num_key_value_heads * args.head_dim
        names = self.layer_names(layer)
        shapes = {
            "ln1": (hidden,),
            "q": (q_rows, hidden),
            "k": (kv_rows, hidden),
            "v": (kv_rows, hidden),
            "q_bias": (q_rows,),
            "k_bias": (kv_rows,),
            "v_bias": (kv_rows,),
            "q_norm": (args.head_dim,),
            "k_norm": (args.head_dim,),
            "o": (hidden, q_rows),
            "ln2": (hidden,),
            **self.ffn_shapes(layer),
        }
        return [(names[role], shapes[role]) for role in names]

    def ffn_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        hidden, ffn = self.args.hidden_size, self.args.intermediate_size
        return {"gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}

    def hf_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of every tensor, in the order :meth:`export_tensors` yields them."""
        args = self.args
        hf_globals = self.global_names()
        shapes = [(hf_globals[EMB], (args.vocab_size, args.hidden_size))]
        for layer in range(args.num_hidden_layers):
            shapes += self.layer_shapes(layer)
        shapes.append((hf_globals[FINAL_LN], (args.hidden_size,)))
        if OUT in hf_globals:
            shapes.append((hf_globals[OUT], (args.vocab_size, args.hidden_size)))
        return shapes

    def check_hf_keys(self, keys: list[str], source: str) -> None:
        """Every tensor the config implies is present, and nothing unexplained is left over."""
        have = set(keys)
        want = [name for name, _ in self.hf_shapes()]
        missing = [k for k in want if k not in have]
        if missing:
            raise BTXError(
                f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); the "
                f"checkpoint does not match its config.json (layers={self.args.num_hidden_layers})"
            )
        extra = sorted(have - set(want))
        extra = [k for k in extra if not k.endswith(IGNORED_HF_SUFFIXES)]
        if self.args.tie_word_embeddings:
            extra = [k for k in extra if k != self.GLOBALS[OUT]]
        if extra:
            raise BTXError(
                f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} in all); the checkpoint "
                f"has more layers or modules than its config.json describes"
            )

    # ---- layouts ------------------------------------------------------------------------
    def layer_from_hf(
        self, layer: int, get: Callable[[str], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Layer `layer` as {short megatron name: tensor}, reading HF tensors through `get`."""
        names = self.layer_names(layer)
        tensors = {
            LN1: get(names["ln1"]),
            QKV: qkv_to_mcore(get(names["q"]), get(names["k"]), get(names["v"]), self.args),
            PROJ: get(names["o"]),
            LN2: get(names["ln2"]),
        }
        tensors.update(self.attention_extras_from_hf(names, get))
        tensors.update(self.ffn_from_hf(layer, names, get))
        return tensors

    def attention_extras_from_hf(self, names: dict[str, str], get) -> dict[str, torch.Tensor]:
        """q/k/v biases and QK-norm weights, when the model has them."""
        tensors = {}
        if self.args.qkv_bias:
            q, k, v = (get(names[f"{role}_bias"]) for role in ("q", "k", "v"))
            tensors[QKV_BIAS] = qkv_bias_to_mcore(q, k, v, self.args)
        if self.args.qk_norm:
            tensors[Q_NORM], tensors[K_NORM] = get(names["q_norm"]), get(names["k_norm"])
        return tensors

    def ffn_from_hf(self, layer: int, names: dict[str, str], get) -> dict[str, torch.Tensor]:
        return {FC1: torch.cat([get(names["gate"]), get(names["up"])]), FC2: get(names["down"])}

    def layer_to_hf(
        self, layer: int, tensors: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """HF (name, tensor) of layer `layer` from {short megatron name: tensor}."""
        names = self.layer_names(layer)
        yield names["ln1"], tensors[LN1]
        q, k, v = qkv_from_mcore(tensors[QKV], self.args)
        yield names["q"], q
        yield names["k"], k
        yield names["v"], v
        if self.hf_qkv_bias:
            if self.args.qkv_bias:
                biases = qkv_bias_from_mcore(tensors[QKV_BIAS], self.args)
            else:  # adding a zero bias is exact: the function does not change
                biases = tuple(x.new_zeros(x.shape[0]) for x in (q, k, v))
            for role, bias in zip(("q", "k", "v"), biases):
                yield names[f"{role}_bias"], bias
        if self.HF_QK_NORM:
            yield names["q_norm"], tensors[Q_NORM]
            yield names["k_norm"], tensors[K_NORM]
        yield names["o"], tensors[PROJ]
        yield names["ln2"], tensors[LN2]
        yield from self.ffn_to_hf(layer, names, tensors)

    def ffn_to_hf(
        self, layer: int, names: dict[str, str], tensors
    ) -> Iterator[tuple[str, torch.Tensor]]:
        gate, up = split_fc1(tensors[FC1])
        yield names["gate"], gate
        yield names["up"], up
        yield names["down"], tensors[FC2]

    def import_tensors(
        self, get: Callable[[str], torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(megatron name, tensor) for the whole model, reading HF tensors through `get`."""
        hf_globals = self.global_names()
        yield EMB, pad_vocab(get(hf_globals[EMB]), self.args)
        for layer in range(self.args.num_hidden_layers):
            prefix = f"decoder.layers.{layer}."
            for name, tensor in self.layer_from_hf(layer, get).items():
                yield prefix + name, tensor
        yield FINAL_LN, get(hf_globals[FINAL_LN])
        if OUT in hf_globals:
            yield OUT, pad_vocab(get(hf_globals[OUT]), self.args)

    def export_tensors(
        self,
        read_layer: Callable[[int], dict[str, torch.Tensor]],
        read_global: Callable[[str], torch.Tensor],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for the whole model, in :meth:`hf_shapes` order, from megatron
        tensors read a layer (short names) or a global at a time."""
        vocab = self.args.vocab_size
        hf_globals = self.global_names()
        yield hf_globals[EMB], read_global(EMB)[:vocab].clone()
        for layer in range(self.args.num_hidden_layers):
            yield from self.layer_to_hf(layer, read_layer(layer))
        yield hf_globals[FINAL_LN], read_global(FINAL_LN)
        if OUT in hf_globals:
            yield hf_globals[OUT], read_global(OUT)[:vocab].clone()


def no_biases(cfg: dict[str, Any], source: str) -> None:
    """Llama and Mistral attention: no bias anywhere (megatron-core biases every linear layer or
    q/k/v only)."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise BTXError(
            f"{source}: attention_bias/mlp_bias are not supported ({cfg.get('model_type')} has no "
            f"biases; megatron-core adds biases to every linear layer or to q/k/v only)"
        )


def window_at_least_the_context(cfg: dict[str, Any], source: str) -> int | None:
    """A window that never masks anything (null, or at least the context) is kept; a shorter
    one has no exact form here (megatron-core's local attention has no window)."""
    window = cfg.get("sliding_window")
    max_pos = cfg.get("max_position_embeddings", 2048)
    if window is not None and window < max_pos:
        raise BTXError(
            f"{source}: sliding_window {window} is shorter than max_position_embeddings "
            f"{max_pos}; sliding-window attention is not supported (only null)"
        )
    return window


@register
class Llama(Family):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    adapter = LlamaAdapter
    attention = "llama"
    default_special_ids = (1, 2)

    def check(self, cfg, source):
        no_biases(cfg, source)

    def sliding_window(self, cfg, source):
        return window_at_least_the_context(cfg, source)

    def config_fields(self, args, variant, routing):
        return {"attention_bias": False, "mlp_bias": False}
