"""The training configuration: one YAML file of dataclass sections, with dotted overrides (every
key, what it changes and the test that shows it: docs/CONFIG.md).

A run is described by a single YAML file with the sections below (every key optional unless
said otherwise; the defaults are the BTX paper's where it gives one):

```yaml
run_dir: runs/small_dense         # checkpoints/, metrics.jsonl, tensorboard/, config.yaml
model:                            # one of init_from / hf_config / inline fields
  init_from: null                 # a megatron_btx checkpoint folder (converted or trained):
                                  #   architecture from its manifest, weights loaded, no optimizer
  hf_config: null                 # an HF config.json (or a folder with one): architecture only
  hidden_size: 256                # ... any LlamaArgs field inline (vocab_size defaults to the
                                  #   tokenizer's); num_local_experts > 0 makes an MoE
  init_method_std: 0.02
  spec: auto                      # auto | local | te (Transformer Engine layer spec)
  recompute: false                # full activation recompute
  moe_experts: auto               # auto | sequential | grouped: the MoE experts module (grouped
                                  #   GEMM: TE's, or torch's grouped matmul without TE; auto:
                                  #   grouped with TE or on a bf16 GPU run with the fast kernel)
  kernels: torch                  # torch | liger | auto: liger-kernel's fused RMSNorm, SwiGLU
                                  #   and cross-entropy (GPU; pip install megatron-btx[liger])
  compile: false                  # torch.compile each transformer layer
parallel: {tp: 1, pp: 1, ep: 1, etp: null, vpp: null, sequence_parallel: false,
           distributed_optimizer: false, overlap_grad_reduce: false}
data:
  path: data/small                # a folder prepared by `btx prepare-data` (manifest.json)
  domains: null                   # null: every domain, weighted by train tokens; a list of
                                  #   names; or {name: weight}
  blend: null                     # or explicit [[prefix, weight], ...] (then `tokenizer` needed)
  tokenizer: null                 # default: <path>/tokenizer.model
  valid_domains: null             # domains for per-domain validation (default: the blend's)
  seq_length: 256
  micro_batch_size: 4
  global_batch_size: 8            # = micro_batch_size x microbatches x data-parallel size
  cache_dir: null                 # megatron's dataset index cache (default <run_dir>/data_cache)
optimizer: {weight_decay: 0.1, adam_beta1: 0.9, adam_beta2: 0.95, adam_eps: 1.0e-8,
            clip_grad: 1.0}
train:
  steps: 1000
  lr: 1.0e-4
  min_lr_ratio: 0.1               # cosine decays to lr * min_lr_ratio
  warmup_steps: 100
  lr_decay_style: cosine          # cosine | linear | constant
  lr_decay_steps: null            # default: steps
  eval_interval: 100
  eval_iters: 4                   # global batches per domain per evaluation
  save_interval: 500
  keep_last: 2
  log_interval: 10
  exit_after: null                # stop (with a checkpoint) after this step; schedule unchanged
  seed: 1234
  device: auto                    # auto | cpu | cuda
  dtype: auto                     # auto (bf16 on GPU and on a bf16-capable CPU for hidden >= 512, else fp32) | fp32 | bf16
  resume: auto                    # auto (if RUN/checkpoints/latest exists) | true | false
  verify_hashes: true             # re-hash the checkpoint loaded (init_from, resume) against
                                  #   its manifest's sha256; false skips it (--no-verify-hashes)
moe:
  dispatcher: alltoall            # alltoall | allgather
  aux_loss_coeff: 0.01
  load_balancing: aux_loss        # aux_loss | seq_aux_loss | sinkhorn | none
  capacity_factor: null
  router: null                    # {type: topk|switch|sample_top1|soft, ...}: passed through to
                                  #   megatron_btx.models.routers.install
  local_dispatch: false           # route tokens without the all-to-all machinery when every
                                  #   expert is local (needs parallel.ep = 1 and tp = 1)
logging: {tensorboard: true, wandb: false, wandb_project: megatron_btx, wandb_name: null,
          wandb_mode: null}
```

Command-line overrides are ``--section.key VALUE`` (or ``--section.key=VALUE``); the value is
parsed as YAML and then coerced to the field's type (so ``3e-4`` is a float). Unknown sections
or keys, wrong types and inconsistent settings raise :class:`BTXError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron_btx.config_io import (  # noqa: F401 - the config's readers, re-exported
    MAX_YAML_DEPTH,
    YAMLRefused,
    apply_overrides,
    build_dataclass,
    close_match,
    coerce,
    parse_overrides,
    parse_yaml,
    read_yaml,
)
from megatron_btx.errors import BTXError

# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

#: LlamaArgs fields that may be given inline in the model section.
LLAMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "num_local_experts",
    "num_experts_per_tok",
    "router_aux_loss_coef",
    "bos_token_id",
    "eos_token_id",
)

#: LlamaArgs fields the model section parses (so every saved config.yaml, which lists them as
#: null, still loads) but refuses a value for: training would not read it (docs/CONFIG.md).
INERT_MODEL_KEYS = {
    "router_aux_loss_coef": "training's load-balancing coefficient is moe.aux_loss_coeff",
    "bos_token_id": "the BOS/EOS ids are the tokenizer's (data.tokenizer)",
    "eos_token_id": "the BOS/EOS ids are the tokenizer's (data.tokenizer)",
}


@dataclass
class ModelConfig:
    init_from: str | None = None
    hf_config: str | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    rms_norm_eps: float | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool | None = None
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None
    router_aux_loss_coef: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    init_method_std: float = 0.02
    spec: str = "auto"
    recompute: bool = False
    # speed-ups (megatron_btx/models/speedups.py)
    moe_experts: str = "auto"
    kernels: str = "torch"
    compile: bool = False

    def inline_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LLAMA_FIELDS if getattr(self, k) is not None}


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False


@dataclass
class DataConfig:
    path: str | None = None
    domains: list[str] | dict[str, float] | None = None
    blend: list[list[Any]] | None = None
    tokenizer: str | None = None
    valid_domains: list[str] | None = None
    seq_length: int = 256
    micro_batch_size: int = 4
    global_batch_size: int = 8
    cache_dir: str | None = None


@dataclass
class OptimizerConfig:
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    lr_decay_style: str = "cosine"
    lr_decay_steps: int | None = None
    eval_interval: int = 100
    eval_iters: int = 4
    save_interval: int = 500
    keep_last: int = 2
    log_interval: int = 10
    exit_after: int | None = None
    seed: int = 1234
    device: str = "auto"
    dtype: str = "auto"
    resume: str | bool = "auto"
    verify_hashes: bool = True


@dataclass
class MoEConfig:
    dispatcher: str = "alltoall"
    aux_loss_coeff: float = 0.01
    load_balancing: str = "aux_loss"
    capacity_factor: float | None = None
    router: dict[str, Any] | None = None
    local_dispatch: bool = False

    def router_settings(self, train_steps: int) -> dict[str, Any] | None:
        """The BTX router's settings (megatron_btx.models.routers.install), with this section's
        load balancing: `load_balancing` none turns the paper's loss off, `aux_loss_coeff` is its
        alpha; Sample Top-1 anneals its temperature over the run's `train.steps` unless
        `router.anneal_steps` says otherwise. None: megatron-core's own router."""
        if self.router is None:
            return None
        router = dict(self.router)
        router["load_balancing"] = self.load_balancing != "none"
        router["alpha"] = self.aux_loss_coeff
        from megatron_btx.models import router_types

        name = router.get("type")
        known = isinstance(name, str) and name in router_types.names()
        for key, value in (
            router_types.get(name).run_defaults(train_steps) if known else {}
        ).items():
            router.setdefault(key, value)
        return router

    def validate(self) -> None:
        _one_of("moe.dispatcher", self.dispatcher, ("alltoall", "allgather"))
        _one_of(
            "moe.load_balancing",
            self.load_balancing,
            ("aux_loss", "seq_aux_loss", "sinkhorn", "none"),
        )
        if not self.aux_loss_coeff >= 0 or self.aux_loss_coeff == float("inf"):
            raise BTXError(f"moe.aux_loss_coeff={self.aux_loss_coeff} must be a finite number >= 0")
        if self.router is None:
            return
        if not isinstance(self.router, dict) or "type" not in self.router:
            raise BTXError("moe.router must be a mapping with a 'type' (e.g. {type: topk})")
        for key, instead in (("alpha", "aux_loss_coeff"), ("load_balancing", "load_balancing")):
            if key in self.router:
                raise BTXError(
                    f"moe.router.{key}: set moe.{instead} instead (one key for the BTX router "
                    f"and megatron-core's)"
                )
        if self.load_balancing not in ("aux_loss", "none"):
            raise BTXError(
                f"moe.load_balancing={self.load_balancing!r}: the BTX router (moe.router) "
                f"implements the paper's loss only; use aux_loss or none"
            )
        if self.capacity_factor is not None:
            raise BTXError(
                "moe.capacity_factor is megatron-core's router's; with moe.router set the Switch "
                "router's capacity is moe.router.capacity_factor"
            )
        from megatron_btx.models.router_settings import RouterSettings

        RouterSettings.from_dict(self.router_settings(train_steps=1))


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_btx"
    wandb_name: str | None = None
    wandb_mode: str | None = None


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        from megatron_btx.rundir import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Config:
        return build_dataclass(cls, d, "", source)

    # ---- consistency -------------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> None:
        """Check everything that does not need the model architecture or the data on disk;
        with `world_size`, also the parallel layout against it."""
        p, t, d, m = self.parallel, self.train, self.data, self.moe
        for key, val in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.ep", p.ep)):
            if val < 1:
                raise BTXError(f"{key}={val} must be >= 1")
        if p.etp is not None and p.etp < 1:
            raise BTXError(f"parallel.etp={p.etp} must be >= 1 (or null: same as tp)")
        if p.vpp is not None:
            if p.vpp < 2:
                raise BTXError(f"parallel.vpp={p.vpp}: virtual pipeline needs vpp >= 2 (or null)")
            if p.pp < 2:
                raise BTXError(f"parallel.vpp={p.vpp} needs parallel.pp >= 2 (got {p.pp})")
        _one_of("train.device", t.device, ("auto", "cpu", "cuda"))
        _one_of("train.dtype", t.dtype, ("auto", "fp32", "bf16"))
        _one_of("train.lr_decay_style", t.lr_decay_style, ("cosine", "linear", "constant"))
        _one_of("train.resume", t.resume, ("auto", True, False))
        m.validate()
        for key, instead in INERT_MODEL_KEYS.items():
            if getattr(self.model, key) is not None:
                raise BTXError(f"model.{key} has no effect ({instead}); remove it")
        _one_of("model.spec", self.model.spec, ("auto", "local", "te"))
        self._validate_speedups()
        for key in ("steps", "warmup_steps"):
            if getattr(t, key) < 0:
                raise BTXError(f"train.{key}={getattr(t, key)} must be >= 0")
        for key in ("eval_interval", "eval_iters", "save_interval", "keep_last", "log_interval"):
            if getattr(t, key) < 1:
                raise BTXError(f"train.{key}={getattr(t, key)} must be >= 1")
        if t.lr <= 0:
            raise BTXError(f"train.lr={t.lr} must be positive")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise BTXError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
        if t.lr_decay_steps is not None and t.lr_decay_steps < 1:
            raise BTXError(f"train.lr_decay_steps={t.lr_decay_steps} must be >= 1 (or null)")
        if t.exit_after is not None and t.exit_after < 0:
            raise BTXError(f"train.exit_after={t.exit_after} must be >= 0 (or null)")
        self._validate_numbers()
        for key in ("seq_length", "micro_batch_size", "global_batch_size"):
            if getattr(d, key) < 1:
                raise BTXError(f"data.{key}={getattr(d, key)} must be >= 1")
        if d.global_batch_size % d.micro_batch_size:
            raise BTXError(
                f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                f"data.micro_batch_size={d.micro_batch_size}"
            )
        if d.path is None and d.blend is None:
            raise BTXError("data.path (a prepared data folder) or data.blend must be set")
        if d.blend is not None:
            if d.domains is not None:
                raise BTXError("data.blend and data.domains are exclusive; set only one")
            for i, item in enumerate(d.blend):
                if not (isinstance(item, (list, tuple)) and len(item) == 2):
                    raise BTXError(f"data.blend[{i}] must be [prefix, weight], got {item!r}")
            if d.tokenizer is None and d.path is None:
                raise BTXError("data.blend needs data.tokenizer (the tokenizer.model path)")
        if self.model.init_from and self.model.hf_config:
            raise BTXError("model.init_from and model.hf_config are exclusive; set only one")
        if world_size is not None:
            self.validate_world(world_size)

    def _validate_speedups(self) -> None:
        from megatron_btx.models.speedups import KERNELS, MOE_EXPERTS  # no torch import

        p = self.parallel
        _one_of("model.moe_experts", self.model.moe_experts, MOE_EXPERTS)
        _one_of("model.kernels", self.model.kernels, KERNELS)
        if self.moe.local_dispatch and (p.ep > 1 or p.tp > 1 or (p.etp or 1) > 1):
            raise BTXError(
                f"moe.local_dispatch needs every expert on its rank (parallel.ep = 1, tp = 1, "
                f"etp = 1; got ep={p.ep}, tp={p.tp}, etp={p.etp}); set it to false"
            )

    def _validate_numbers(self) -> None:
        """Ranges of the optimizer's, the MoE's and the model's numbers (each is finite: every
        float key is checked so when it is read, see :func:`coerce`)."""
        o, m = self.optimizer, self.moe
        for section in ("model", "optimizer", "train", "moe"):
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if isinstance(value, float) and abs(value) > FLOAT32_MAX:
                    raise BTXError(
                        f"{section}.{f.name}={value} is beyond what a float32 holds ("
                        f"{FLOAT32_MAX:.3g}): training computes in float32 at most"
                    )
        if not 0 <= self.train.seed < 2**32:
            raise BTXError(
                f"train.seed={self.train.seed} must be in [0, 2**32 - 1] (numpy's and torch's "
                f"generators take 32-bit seeds)"
            )
        for key, value in (("adam_beta1", o.adam_beta1), ("adam_beta2", o.adam_beta2)):
            if not 0.0 <= value < 1.0:
                raise BTXError(f"optimizer.{key}={value} must be in [0, 1)")
        if o.adam_eps <= 0:
            raise BTXError(f"optimizer.adam_eps={o.adam_eps} must be > 0")
        if o.weight_decay < 0:
            raise BTXError(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
        if o.clip_grad < 0:
            raise BTXError(f"optimizer.clip_grad={o.clip_grad} must be >= 0 (0: no clipping)")
        if m.aux_loss_coeff < 0:
            raise BTXError(f"moe.aux_loss_coeff={m.aux_loss_coeff} must be >= 0")
        if m.capacity_factor is not None and m.capacity_factor <= 0:
            raise BTXError(f"moe.capacity_factor={m.capacity_factor} must be > 0 (or null)")
        if self.model.init_method_std <= 0:
            raise BTXError(f"model.init_method_std={self.model.init_method_std} must be > 0")

    def validate_world(self, world_size: int) -> None:
        p, d = self.parallel, self.data
        if world_size % (p.tp * p.pp):
            raise BTXError(
                f"parallel.tp x parallel.pp = {p.tp}x{p.pp} does not divide the world size "
                f"{world_size}; launch a multiple of {p.tp * p.pp} processes"
            )
        etp = p.etp if p.etp is not None else p.tp
        if world_size % (etp * p.ep * p.pp):
            raise BTXError(
                f"parallel.etp x parallel.ep x parallel.pp = {etp}x{p.ep}x{p.pp} does not "
                f"divide the world size {world_size}"
            )
        dp = world_size // (p.tp * p.pp)
        if d.global_batch_size % (d.micro_batch_size * dp):
            raise BTXError(
                f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                f"data.micro_batch_size x data-parallel size = {d.micro_batch_size}x{dp}"
            )

    def validate_model(self, args: Any) -> None:
        """Checks that need the resolved architecture (a LlamaArgs)."""
        p = self.parallel
        if args.num_attention_heads % p.tp:
            raise BTXError(
                f"parallel.tp={p.tp} does not divide model.num_attention_heads="
                f"{args.num_attention_heads}"
            )
        if args.num_key_value_heads % p.tp:
            raise BTXError(
                f"parallel.tp={p.tp} does not divide model.num_key_value_heads="
                f"{args.num_key_value_heads}"
            )
        if args.intermediate_size % p.tp:
            raise BTXError(
                f"parallel.tp={p.tp} does not divide model.intermediate_size="
                f"{args.intermediate_size}"
            )
        stages = p.pp * (p.vpp or 1)
        if args.num_hidden_layers % stages:
            raise BTXError(
                f"parallel.pp x parallel.vpp = {stages} does not divide "
                f"model.num_hidden_layers={args.num_hidden_layers}"
            )
        if p.ep > 1 and (not args.is_moe or args.num_local_experts % p.ep):
            raise BTXError(
                f"parallel.ep={p.ep} needs an MoE whose model.num_local_experts "
                f"({args.num_local_experts}) is a multiple of it"
            )
        if args.is_moe and args.num_experts_per_tok > args.num_local_experts:
            raise BTXError(
                f"model.num_experts_per_tok={args.num_experts_per_tok} exceeds "
                f"model.num_local_experts={args.num_local_experts}"
            )
        if (
            args.is_moe
            and self.moe.router is None
            and args.num_experts_per_tok == 1
            and args.norm_topk_prob
        ):
            raise BTXError(
                "model.num_experts_per_tok=1 with model.norm_topk_prob=true gives every token "
                "a gate of 1, so megatron's router gets no gradient; set model.norm_topk_prob: "
                "false (softmax over all experts, Switch-style) or choose moe.router"
            )
        if self.data.seq_length > args.max_position_embeddings:
            raise BTXError(
                f"data.seq_length={self.data.seq_length} exceeds "
                f"model.max_position_embeddings={args.max_position_embeddings}"
            )
        if self.moe.router is not None and not args.is_moe:
            raise BTXError("moe.router is set but the model is dense (num_local_experts = 0)")


#: the largest finite float32: every float key reaches torch as one (a learning rate of 1e300
#: overflowed in the optimizer with a traceback)
FLOAT32_MAX = 3.4028234663852886e38


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise BTXError(f"{key}={value!r} must be one of {', '.join(map(str, allowed))}")


def load(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | list[tuple[str, Any]] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Read a YAML config (or start from `base`), apply overrides, build and validate it."""
    raw = dict(base or {})
    source = "config"
    if path is not None:
        raw.update(read_yaml(path))
        source = str(path)
    if overrides:
        pairs = (
            parse_overrides(overrides)  # type: ignore[arg-type]
            if overrides and isinstance(overrides[0], str)
            else overrides
        )
        raw = apply_overrides(raw, pairs)  # type: ignore[arg-type]
    cfg = Config.from_dict(raw, source)
    try:
        cfg.validate()
    except BTXError as e:  # name the file (build errors already do)
        raise (e if str(e).startswith(source) else BTXError(f"{source}: {e}")) from None
    return cfg
