"""The BTX run configuration: one YAML file describing a whole Branch-Train-MiX run (every key,
what it changes and the test that shows it: docs/CONFIG.md).

```yaml
run_dir: runs/small_btx            # everything of the run lives here (see megatron_btx.pipeline.plan)
data:
  prepared: null                   # an existing `btx prepare-data` folder: skip preparation
  vocab_size: 8000                 # SentencePiece vocabulary trained on the domains
  tokenizer: null                  # or an existing SentencePiece .model (e.g. the seed's)
  max_mb: 4.0                      # built-in corpora: MB of text kept per domain (0 = all)
  split: test=0.08,valid=0.02      # held-out document fractions (by a stable hash of the key)
  txt_separator: null              # text files: a line equal to this separates documents
  seq_length: 256
domains:                           # name -> a built-in corpus, or folders/files of text
  code: builtin                    #   short form: `builtin` / a path / a list of paths
  math: {source: builtin, weight: 0.3}   # weight: finetune (and dense baseline) sampling weight;
  mine: {source: [notes/, a.txt]}  #   default: uniform
model: {hidden_size: 128, ...}     # the dense architecture (LlamaArgs fields); refused with seed.init_from
seed:
  init_from: null                  # an existing seed: megatron checkpoint folder, a run dir with
                                   #   checkpoints/latest, or an HF Llama folder (imported first)
  pretrain: {steps: 200, lr: 2e-3} # else: pretrain one on the mix of all domains (train-stage keys)
experts:                           # train-stage keys (below), applied to every domain expert
  steps: 150
merge:
  seed_as_expert: true             # keep the seed as the generalist expert (paper: yes)
  router_init: random              # random | zero | centroid (megatron_btx.merge.router_inits)
  top_k: null                      # and any other `btx merge` setting by its name (split_chunks,
                                   #   blend, moe_layers, router_std, ...: merge.settings.run_keys)
finetune:                          # train-stage keys for the MoE finetune, plus:
  steps: 60
  router: {type: topk}             # topk | switch | sample_top1 | soft (megatron_btx.models.routers)
  load_balancing: aux_loss         # aux_loss | none (what the BTX routers implement)
  aux_loss_coeff: 0.01             # alpha
baselines:                         # one key per baseline (megatron_btx.pipeline.baselines):
  dense: true                      # the seed continued on the blend
  sparse_upcycling: true           # N copies of the seed -> MoE, trained on the blend
  btm: true                        # experts kept separate, tf-idf routed ensembles at eval
  compute_match: flops             # flops | time (measured wall time per stage) | none
  dense_train: {}                  # <name>_train: train-stage keys over a baseline's defaults
extend:                            # optional: experts added to the finetuned MoE (btx merge --into)
  domains: {legal: builtin}        #   new domains (the forms of `domains`), an expert each
  shared: keep                     #   keep | average: the MoE's non-expert tensors
  router_init: null                #   the new router rows (default: merge.router_init)
  finetune: {steps: 20}            #   a brief finetune on the blend with them (default: 1/4)
  scratch: true                    #   and BTX trained from scratch with every expert
evaluation:
  split: test                      # held-out split to score (test | valid)
  tokens_per_domain: 65536         # scored tokens per domain (whole sequences of seq_length)
  btm_top_k: [1, 2]
  routing: true                    # routing tables and heatmaps for the BTX MoE
  lm_eval:                         # downstream tasks on each model's HF export (btx evaluate
    tasks: []                      #   --lm-eval): lm-evaluation-harness task names; [] = none
    tasks_dir: null                #   a folder of task YAML files (e.g. examples/smol_mc)
    limit: null                    #   at most this many documents per task
    batch_size: 1                  #   requests per forward pass (speed only)
train: {}                          # defaults for every train stage: any key of the training
                                   #   config's train section (eval_interval, log_interval, ...)
optimizer: {}                      # the training config's optimizer section, for every stage
logging: {tensorboard: false}      # the training config's logging section, for every stage
```

Train-stage keys (seed.pretrain, experts, finetune, and each baseline's optional override):
``steps, lr, warmup_steps, min_lr_ratio, micro_batch_size, global_batch_size, nproc,
parallel: {tp, pp, ep, ...}, train: {...any training-config train key}``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_btx.config import build_dataclass, read_yaml  # the same checks as `btx train`
from megatron_btx.data.names import valid_domain_name
from megatron_btx.errors import BTXError

BUILTIN = "builtin"


@dataclass
class StageTrain:
    """How one training stage runs (steps, schedule, batch, processes, parallel layout)."""

    steps: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    nproc: int = 1
    parallel: dict[str, Any] | None = None
    train: dict[str, Any] | None = None


@dataclass
class FinetuneConfig(StageTrain):
    router: dict[str, Any] | None = None
    load_balancing: str = "aux_loss"
    aux_loss_coeff: float = 0.01


@dataclass
class DataSection:
    prepared: str | None = None
    vocab_size: int = 8000
    tokenizer: str | None = None
    max_mb: float = 4.0
    #: held-out fractions, by a stable hash of each document's key; test=0.08 holds out >= 64k
    #: tokens of every built-in domain at max_mb 4 (measured: 80k-148k)
    split: str = "test=0.08,valid=0.02"
    txt_separator: str | None = None
    seq_length: int = 256
    #: held-out mixed documents (paragraphs of several domains' test documents) of about this
    #: many tokens, evaluated as one more domain; 0 = none
    mixed_tokens: int = 65536


@dataclass
class DomainConfig:
    source: str | list[str] = BUILTIN
    weight: float | None = None
    #: false: a general domain: in the seed's and the finetune's data and in evaluation, but no
    #: expert of its own (the paper's general data, 19% of its finetuning mix)
    expert: bool = True

    @property
    def is_builtin(self) -> bool:
        return self.source == BUILTIN

    @property
    def paths(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)


@dataclass
class SeedConfig:
    init_from: str | None = None
    pretrain: StageTrain | None = None
    #: the seed pretrains on these domains (uniformly); default: every domain, at their weights
    domains: list[str] | None = None


def _section(data: Any, prefix: str, source: str) -> dict[str, Any]:
    """A config section's mapping (null: empty); anything else is an error naming it."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BTXError(f"{source}: {prefix.rstrip('.')} must be a mapping")
    return data


def _known(key: Any, keys: set[str], prefix: str, source: str) -> None:
    """`key` is one of `keys`, or an error naming it (with the closest known key)."""
    from megatron_btx.config import close_match

    if key not in keys:
        close = close_match(str(key), keys)
        hint = f" (did you mean {prefix}{close}?)" if close else ""
        raise BTXError(f"{source}: unknown key {prefix + str(key)!r}{hint}")


@dataclass
class MergeConfig:
    """The run's merge: whether the seed is one of its sources, and any `btx merge` setting a
    run may choose (:func:`megatron_btx.merge.settings.run_keys`: router_init, top_k,
    split_chunks, blend, moe_layers, ...), by the setting's name. The merge's own schema
    (:class:`~megatron_btx.merge.settings.MergeSettings`) checks and defaults them."""

    seed_as_expert: bool = True
    #: the settings the run config gives (the others keep the merge's defaults)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, data: Any, prefix: str, source: str) -> MergeConfig:
        from megatron_btx.config import coerce
        from megatron_btx.merge.settings import check_run_value, run_keys

        data = dict(_section(data, prefix, source))
        seed = coerce(data.pop("seed_as_expert", True), bool, f"{prefix}seed_as_expert", source)
        keys = run_keys()
        for key, value in data.items():
            _known(key, {"seed_as_expert", *keys}, prefix, source)
            check_run_value(key, value, source)
        return cls(seed, data)

    def value(self, key: str) -> Any:
        """A merge setting: as the run config gives it, else the merge's default."""
        from megatron_btx.merge.settings import run_keys

        return self.settings[key] if key in self.settings else run_keys()[key]

    def to_dict(self) -> dict[str, Any]:
        return {"seed_as_expert": self.seed_as_expert, **self.settings}


@dataclass
class BaselinesConfig:
    """``baselines:``: for every registered baseline (:mod:`megatron_btx.pipeline.baselines`)
    its on/off key and, for those that train, ``<name>_train`` (train-stage keys over its
    defaults); and how their compute is matched to BTX's."""

    #: flops: 6 x active params x tokens; time: measured hardware time (the paper's GPU-days);
    #: none: the baselines' own steps (true/false mean flops/none)
    compute_match: str | bool = "flops"
    #: baseline name -> planned or not, as the config gives it (:meth:`on` fills defaults)
    enabled: dict[str, bool] = field(default_factory=dict)
    #: baseline name -> its `<name>_train` overrides, when given
    train: dict[str, StageTrain] = field(default_factory=dict)
    #: baseline name -> its own options, when given (``baselines.<name>: {KEY: VALUE}``)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, data: Any, prefix: str, source: str) -> BaselinesConfig:
        from megatron_btx.config import coerce
        from megatron_btx.pipeline import baselines as registry

        out = cls()
        names = registry.names()
        keys = {"compute_match", *names}
        keys |= {f"{n}_train" for n in names if registry.get(n).trains}
        for key, value in _section(data, prefix, source).items():
            full = f"{prefix}{key}"
            _known(key, keys, prefix, source)
            if key == "compute_match":
                out.compute_match = coerce(value, str | bool, full, source)
            elif key.endswith("_train"):
                if value is not None:
                    out.train[key[: -len("_train")]] = build_dataclass(
                        StageTrain, value, f"{full}.", source
                    )
            elif isinstance(value, dict):  # the baseline's own options: it is on
                out.options[key] = _baseline_options(registry.get(key), value, full, source)
                out.enabled[key] = True
            else:
                out.enabled[key] = coerce(value, bool, full, source)
        return out

    def options_of(self, name: str) -> dict[str, Any]:
        """Baseline `name`'s options: as the config gives them over the baseline's defaults."""
        from megatron_btx.pipeline import baselines as registry

        return {**registry.get(name).options, **self.options.get(name, {})}

    def on(self, name: str) -> bool:
        """Whether baseline `name` is planned: as the config says, else its default."""
        from megatron_btx.pipeline import baselines as registry

        return bool(self.enabled.get(name, registry.get(name).default))

    def to_dict(self) -> dict[str, Any]:
        from megatron_btx.pipeline import baselines as registry

        enabled: dict[str, Any] = {name: self.on(name) for name in registry.names()}
        for name, options in self.options.items():
            if enabled[name]:
                enabled[name] = dict(options)
        raw: dict[str, Any] = {"compute_match": self.compute_match, **enabled}
        for name, stage in self.train.items():
            raw[f"{name}_train"] = dataclasses.asdict(stage)
        return raw


def _baseline_options(baseline: Any, value: dict, full: str, source: str) -> dict[str, Any]:
    """``baselines.<name>: {KEY: VALUE}``: known keys, values the baseline can use."""
    from megatron_btx.config import close_match

    for key in value:
        if key not in baseline.options:
            close = close_match(str(key), set(baseline.options))
            hint = f" (did you mean {full}.{close}?)" if close else ""
            known = ", ".join(baseline.options) or "none"
            raise BTXError(f"{source}: unknown key {full}.{key!r}{hint} (its options: {known})")
    baseline.check_options({**baseline.options, **value}, source)
    return dict(value)


@dataclass
class ExtendConfig:
    """``extend:``: domains added after the BTX MoE is finetuned. Each gets an expert branched
    from the seed (the experts' stage settings); they are added to the finetuned MoE as experts
    N+1... (``btx merge --into``, ``shared`` and ``router_init`` its settings), which is then
    finetuned briefly on the blend with them (``finetune``: train-stage keys over the
    finetune's; default a quarter of its steps). The evaluation compares it with the MoE it
    extends (forgetting on the old domains, gain on the new ones) and, with ``scratch``, with
    BTX trained from scratch with every expert (its merge and whole finetune on that blend)."""

    domains: dict[str, Any] = field(default_factory=dict)
    shared: str = "keep"
    router_init: str | None = None
    finetune: StageTrain | None = None
    scratch: bool = True


@dataclass
class LmEvalSection:
    """``evaluation.lm_eval``: lm-evaluation-harness tasks run by the evaluate stage on each
    model's HF export (its ``--lm-eval`` flags; megatron_btx/eval/lm_eval.py)."""

    tasks: list[str] = field(default_factory=list)
    #: a folder of task YAML files with local data (only it is indexed); null: lm-eval's own
    tasks_dir: str | None = None
    limit: int | None = None
    #: requests per forward pass of lm-eval's HF model (speed; the same scores)
    batch_size: int = 1

    def argv(self) -> list[str]:
        """The evaluate stage's flags ([] without tasks)."""
        if not self.tasks:
            return []
        out = ["--lm-eval", ",".join(self.tasks)]
        if self.tasks_dir is not None:
            out += ["--lm-eval-tasks-dir", self.tasks_dir]
        if self.limit is not None:
            out += ["--lm-eval-limit", str(self.limit)]
        if self.batch_size != 1:
            out += ["--lm-eval-batch-size", str(self.batch_size)]
        return out


@dataclass
class EvalConfig:
    split: str = "test"
    tokens_per_domain: int = 65536
    btm_top_k: list[int] = field(default_factory=lambda: [1, 2])
    #: BTM routes each held-out document on its first tokens (at most half the document);
    #: they are scored for no model
    btm_route_tokens: int = 128
    routing: bool = True
    micro_batch_size: int = 8
    lm_eval: LmEvalSection = field(default_factory=LmEvalSection)


@dataclass
class BTXConfig:
    run_dir: str = "runs/btx"
    data: DataSection = field(default_factory=DataSection)
    domains: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    seed: SeedConfig = field(default_factory=SeedConfig)
    experts: StageTrain = field(default_factory=StageTrain)
    merge: MergeConfig = field(default_factory=MergeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    extend: ExtendConfig | None = None
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    train: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    logging: dict[str, Any] = field(default_factory=lambda: {"tensorboard": False})
    #: where the YAML was read from (relative data paths are resolved against its folder)
    source: str | None = None

    # ---- derived --------------------------------------------------------------------------
    def domain(self, name: str) -> DomainConfig:
        return self._domains[name] if name in self._domains else self._new_domains[name]

    @property
    def new_domain_names(self) -> list[str]:
        """The domains ``extend`` adds (none without it)."""
        return list(self._new_domains)

    @property
    def all_domain_names(self) -> list[str]:
        """Every domain prepared and evaluated: the run's, then those ``extend`` adds."""
        return [*self._domains, *self._new_domains]

    @property
    def domain_names(self) -> list[str]:
        """Every domain: prepared, in the finetuning blend, evaluated."""
        return list(self._domains)

    @property
    def expert_names(self) -> list[str]:
        """The domains that get an expert (and are the MoE's routed experts, in order)."""
        return [n for n, d in self._domains.items() if d.expert]

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw.pop("source", None)
        raw["merge"] = self.merge.to_dict()
        raw["baselines"] = self.baselines.to_dict()
        return raw

    def validate(self) -> None:
        if not self.domains:
            raise BTXError(f"{self.source or 'config'}: `domains` must name at least one domain")
        doms = {name: self._domain(name, spec, "domains") for name, spec in self.domains.items()}
        self._domains = doms
        self._new_domains: dict[str, DomainConfig] = {}
        if self.extend is not None:
            self._validate_extend()
        weights = [d.weight for d in doms.values()]
        if any(w is not None for w in weights) and not any(w for w in weights if w):
            raise BTXError("domains: at least one weight must be positive")
        if self.data.prepared:
            self.data.prepared = self._resolve(self.data.prepared)
        if self.data.tokenizer:
            self.data.tokenizer = self._resolve(self.data.tokenizer)
        if self.seed.init_from:
            self.seed.init_from = self._resolve(self.seed.init_from)
        elif self.seed.pretrain is None:
            raise BTXError("seed: give seed.init_from (a checkpoint) or seed.pretrain: {steps: N}")
        for name in self.seed.domains or []:
            if name not in doms:
                raise BTXError(f"seed.domains: {name!r} is not a domain ({', '.join(doms)})")
        if not self.expert_names:
            raise BTXError("domains: every domain has expert: false; at least one needs an expert")
        if self.data.mixed_tokens < 0:
            raise BTXError(f"data.mixed_tokens={self.data.mixed_tokens} must be >= 0 (0 = none)")
        if self.merge.value("seed_as_shared_expert") and not self.merge.seed_as_expert:
            raise BTXError(
                "merge.seed_as_shared_expert needs merge.seed_as_expert: true (the seed's FFN is "
                "the shared expert instead of a routed one)"
            )
        if self.evaluation.split not in ("test", "valid"):
            raise BTXError(f"evaluation.split={self.evaluation.split!r}: test | valid")
        if self.evaluation.tokens_per_domain < self.data.seq_length:
            raise BTXError(
                f"evaluation.tokens_per_domain={self.evaluation.tokens_per_domain} must be at "
                f"least data.seq_length={self.data.seq_length}"
            )
        match = self.baselines.compute_match
        if isinstance(match, bool):
            self.baselines.compute_match = "flops" if match else "none"
        elif match not in ("flops", "time", "none"):
            raise BTXError(f"baselines.compute_match={match!r}: flops | time | none")
        if self.evaluation.btm_route_tokens < 1:
            raise BTXError(
                f"evaluation.btm_route_tokens={self.evaluation.btm_route_tokens} must be >= 1"
            )
        for k in self.evaluation.btm_top_k:
            if not 1 <= k <= len(doms):
                raise BTXError(f"evaluation.btm_top_k: {k} must be in 1..{len(doms)}")
        self._validate_lm_eval()
        for key, st in (
            ("experts", self.experts),
            ("finetune", self.finetune),
            ("seed.pretrain", self.seed.pretrain),
        ):
            if st is not None:
                if st.steps is None and key != "seed.pretrain" or (st.steps or 0) < 0:
                    raise BTXError(f"{key}.steps must be set (>= 0)")
                if st.nproc < 1:
                    raise BTXError(f"{key}.nproc={st.nproc} must be >= 1")
        if self.seed.pretrain is not None and self.seed.pretrain.steps is None:
            raise BTXError("seed.pretrain.steps must be set")
        self._reject_inert_keys()

    def _domain(self, name: Any, spec: Any, section: str) -> DomainConfig:
        """One entry of `domains` (or ``extend.domains``), checked."""
        if not valid_domain_name(name):
            raise BTXError(
                f"{section}.{name}: a domain name is ASCII letters, digits, '-' or '_' (it "
                f"names files, stages and Slurm jobs)"
            )
        if isinstance(spec, (str, list)):
            spec = {"source": spec}
        dom = build_dataclass(DomainConfig, spec, f"{section}.{name}.", self.source or "config")
        if dom.weight is not None and dom.weight < 0:
            raise BTXError(f"{section}.{name}.weight={dom.weight} must be >= 0")
        if not dom.is_builtin:
            dom.source = [self._resolve(p) for p in dom.paths]
            for p in dom.source:
                if not os.path.exists(p):
                    raise BTXError(
                        f"{section}.{name}.source: {p} does not exist (give a folder or files "
                        f"of text, or `builtin` for a built-in corpus)"
                    )
        else:
            from megatron_btx.data.corpora import DOMAINS

            if name not in DOMAINS and self.data.prepared is None:
                raise BTXError(
                    f"{section}.{name}: `builtin` only exists for {', '.join(DOMAINS)}; give "
                    f"a folder or files of text as {section}.{name}.source"
                )
        return dom

    def _validate_extend(self) -> None:
        from megatron_btx.merge import router_inits
        from megatron_btx.merge import settings as merge_settings

        ext = self.extend
        if not isinstance(ext.domains, dict) or not ext.domains:
            raise BTXError("extend.domains must name at least one domain to add")
        for name, spec in ext.domains.items():
            if name in self._domains:
                raise BTXError(
                    f"extend.domains.{name}: already a domain of the run; name a new one"
                )
            dom = self._domain(name, spec, "extend.domains")
            if not dom.expert:
                raise BTXError(f"extend.domains.{name}.expert: an added domain gets an expert")
            self._new_domains[name] = dom
        if ext.shared not in merge_settings.SHARED:
            raise BTXError(f"extend.shared={ext.shared!r}: {' | '.join(merge_settings.SHARED)}")
        if ext.router_init is not None and ext.router_init not in router_inits.names():
            raise BTXError(
                f"extend.router_init={ext.router_init!r}: {' | '.join(router_inits.names())}"
            )
        if ext.finetune is not None and (ext.finetune.steps or 0) < 0:
            raise BTXError("extend.finetune.steps must be >= 0")

    def _validate_lm_eval(self) -> None:
        lm = self.evaluation.lm_eval
        for i, task in enumerate(lm.tasks):
            if not task.strip() or "," in task or task != task.strip():
                raise BTXError(
                    f"evaluation.lm_eval.tasks[{i}]={task!r}: one lm-eval task name per entry "
                    f"(no commas or surrounding spaces)"
                )
        if lm.limit is not None and lm.limit < 1:
            raise BTXError(f"evaluation.lm_eval.limit={lm.limit} must be >= 1 (null: every one)")
        if lm.batch_size < 1:
            raise BTXError(f"evaluation.lm_eval.batch_size={lm.batch_size} must be >= 1")
        if lm.tasks_dir is not None and lm.tasks:  # without tasks: refused as inert
            lm.tasks_dir = self._resolve(lm.tasks_dir)
            if not os.path.isdir(lm.tasks_dir):
                raise BTXError(
                    f"evaluation.lm_eval.tasks_dir: {lm.tasks_dir} is not a folder (give the "
                    f"folder of task YAML files, relative to the config's folder or absolute)"
                )

    def _reject_inert_keys(self) -> None:
        """Keys that another key makes inert are errors, not silently ignored (docs/CONFIG.md)."""
        from megatron_btx.config import LLAMA_FIELDS

        def inert(key: str, why: str) -> BTXError:
            return BTXError(f"{self.source or 'config'}: {key} has no effect ({why}); remove it")

        if self.seed.init_from:
            given = "the seed is seed.init_from"
            if self.seed.pretrain is not None:
                raise inert("seed.pretrain", given)
            if self.seed.domains is not None:
                raise inert("seed.domains", given)
            for key in self.model:
                if key in LLAMA_FIELDS or key == "init_method_std":
                    raise inert(f"model.{key}", f"{given}, which has its own architecture")
        if self.data.prepared:
            for key in ("tokenizer", "txt_separator"):
                if getattr(self.data, key) is not None:
                    raise inert(f"data.{key}", "data.prepared is used as it is")
        elif self.data.txt_separator is not None and all(
            self.domain(n).is_builtin for n in self.domain_names
        ):
            raise inert("data.txt_separator", "every domain is builtin, none is text files")
        if self.merge.value("dense_ffn") != "average" and self.merge.value("moe_layers") is None:
            raise inert("merge.dense_ffn", "every layer is MoE without merge.moe_layers")
        if self.baselines.compute_match != "none":
            for name, stage in self.baselines.train.items():
                if stage.steps is not None:
                    raise inert(
                        f"baselines.{name}_train.steps",
                        f"baselines.compute_match={self.baselines.compute_match} chooses them; "
                        f"set it to none to choose the steps",
                    )
        lm = self.evaluation.lm_eval
        if not lm.tasks:
            for key, default in (("tasks_dir", None), ("limit", None), ("batch_size", 1)):
                if getattr(lm, key) != default:
                    raise inert(f"evaluation.lm_eval.{key}", "evaluation.lm_eval.tasks is empty")
        stages = (
            ("", self),
            ("seed.pretrain.", self.seed.pretrain),
            ("experts.", self.experts),
            ("finetune.", self.finetune),
            *((f"baselines.{n}_train.", st) for n, st in self.baselines.train.items()),
        )
        for prefix, stage in stages:
            if stage is not None and "steps" in (stage.train or {}):
                where = f"{prefix}steps" if prefix else "each stage's steps"
                raise inert(f"{prefix}train.steps", f"{where} sets a stage's length")

    def _resolve(self, p: str) -> str:
        """Paths in the YAML are relative to the current directory if they exist there, else
        to the YAML's folder."""
        path = Path(os.path.expanduser(p))
        if path.is_absolute() or path.exists() or self.source is None:
            return str(path.resolve()) if path.exists() else str(path)
        alt = Path(self.source).resolve().parent / path
        return str(alt.resolve()) if alt.exists() else str(path)

    def weights(self) -> dict[str, float]:
        """Finetune (and dense-baseline) sampling weights: the given ones (a domain without one
        gets 0 when any is given), else uniform; normalised to sum to 1. Deliberately not derived
        from the prepared data, so the plan is the same before and after preparation."""
        return _normalised(self._raw_weights())

    def _raw_weights(self) -> dict[str, float]:
        given = {n: d.weight for n, d in self._domains.items()}
        if any(w is not None for w in given.values()):
            return {n: float(v or 0.0) for n, v in given.items()}
        return {n: 1.0 for n in self._domains}

    def extended_weights(self) -> dict[str, float]:
        """The blend with the domains ``extend`` adds: each at its given weight (on the scale of
        the run's given weights), else at the mean weight of the run's expert domains;
        normalised to sum to 1."""
        raw = self._raw_weights()
        mean = sum(raw[n] for n in self.expert_names) / len(self.expert_names)
        for name, dom in self._new_domains.items():
            raw[name] = float(dom.weight) if dom.weight is not None else mean
        return _normalised(raw)


def _normalised(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values()) or 1.0
    return {n: v / total for n, v in weights.items()}


def from_dict(raw: dict[str, Any], source: str | None = None) -> BTXConfig:
    raw = dict(raw or {})
    for key in ("domains", "model", "train", "optimizer", "logging"):
        if raw.get(key) is None and key in raw:
            raw.pop(key)
    cfg = build_dataclass(BTXConfig, raw, "", source or "config", exclude=("source",))
    cfg.source = source
    cfg.validate()
    return cfg


def load(
    path_or_obj: str | os.PathLike[str] | dict[str, Any] | BTXConfig,
    overrides: list[str] | None = None,
) -> BTXConfig:
    """A BTXConfig from a YAML path, a dict or an existing config; `overrides` are
    ``--section.key VALUE`` pairs as for `btx train`."""
    if isinstance(path_or_obj, BTXConfig):
        if overrides:
            return load(path_or_obj.to_dict() | {}, overrides)
        return path_or_obj
    from megatron_btx.config import apply_overrides, parse_overrides

    if isinstance(path_or_obj, dict):
        raw, source = path_or_obj, None
    else:
        raw, source = read_yaml(path_or_obj), os.fspath(path_or_obj)
    if overrides:
        raw = apply_overrides(raw, parse_overrides(overrides))
    return from_dict(raw, source)
