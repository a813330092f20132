"""The BTX plan: a BTX config -> a list of stages (btx command lines) with dependencies.

The plan is the one description of a run that every executor shares: the local executor
(`btx run`, :mod:`megatron_btx.pipeline.local`) runs each stage as a subprocess ``btx <argv>``;
a Slurm executor submits the same command lines as jobs with ``--dependency=afterok``. Stages
talk only through files under the run directory, so any stage can run on any machine.

Run directory layout::

    RUN/btx.yaml                  the resolved BTX config (paths absolute)
    RUN/plan.json                 the stages below, as JSON
    RUN/configs/<stage>.yaml      the training config of each train stage (`btx train` input)
    RUN/data/                     prepared domains (unless data.prepared is given)
    RUN/seed/                     the pretrained seed (a `btx train` run dir)
    RUN/experts/<domain>/         one dense expert per domain (run dirs)
    RUN/merged/                   the MiX checkpoint (experts' FFNs + averaged rest + routers)
    RUN/finetune/                 the BTX MoE after finetuning (run dir)
    RUN/baselines/dense/          the seed continued on the blend (run dir)
    RUN/baselines/upcycled/       N copies of the seed merged (sparse upcycling init)
    RUN/baselines/sparse_upcycling/  that MoE trained on the blend (run dir)
    RUN/eval/                     results.{json,md}, routing.{json,md}, routing_*.png
    RUN/stages/<stage>.done       done markers (JSON: times, FLOPs), written by the executor
    RUN/logs/<stage>.log          each stage's output

Stage argv is the *single-process* command line; a train stage with ``nproc > 1`` runs under
``torchrun --nproc-per-node nproc`` (locally `btx train ... --nproc-per-node N` does that).
Train stages are resumable: re-running the same argv resumes from ``checkpoints/latest``.

Compute accounting: training FLOPs = 6 x active parameters x tokens, where the active parameters
are those in a matrix multiply per token (transformer layers with the top-k experts, the router
and the output layer; not the input embedding lookup). The BTX budget is the experts' training
plus the MoE finetune (the seed's pretraining is shared by every model and not counted); with
``baselines.compute_match`` the dense and sparse-upcycling baselines get as many steps as that
budget buys at their own active size.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_btx.errors import BTXError
from megatron_btx.pipeline import config as btx_config
from megatron_btx.pipeline.config import BTXConfig, StageTrain

#: stage kinds
KINDS = ("data", "convert", "train", "merge", "eval")


@dataclass
class Stage:
    name: str  # e.g. "prepare_data", "seed", "expert_code", "merge", "finetune", "evaluate"
    kind: str  # "data" | "convert" | "train" | "merge" | "eval"
    argv: list[str]  # the btx command line, run as `btx <argv>`
    deps: list[str] = field(default_factory=list)  # stages that must finish first
    nproc: int = 1  # processes (torchrun --nproc-per-node) for train stages
    outputs: list[str] = field(default_factory=list)  # paths that exist when it is done
    resumable: bool = False  # train stages: re-running resumes from checkpoints/latest
    # ---- informational (executors may ignore) -------------------------------------------
    workdir: str | None = None  # the stage's own folder (train: its run dir)
    steps: int = 0  # train stages: optimizer steps
    tokens: int = 0  # train stages: training tokens (steps x global batch x seq length)
    active_params: int = 0  # train stages: parameters active per token (for FLOPs)
    flops: float = 0.0  # train stages: 6 x active_params x tokens
    group: str = "btx"  # btx | baseline | shared (accounting)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage:
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def final_checkpoint(run: str | Path, steps: int) -> str:
    """The checkpoint a finished `btx train` run of `steps` steps leaves."""
    return str(Path(run) / "checkpoints" / iter_name(steps))


def matmul_params(args) -> int:
    """Parameters in a matrix multiply per token (top-k experts only): see the module doc."""
    return int(
        args.num_params(active=True)
        - args.vocab_size * args.hidden_size
        - args.hidden_size * (2 * args.num_hidden_layers + 1)
    )


def _resolve_checkpoint(path: str) -> str:
    """A megatron checkpoint folder from a checkpoint, a `checkpoints` folder or a run dir."""
    p = Path(path)
    for cand in (p, p / "checkpoints"):
        latest = cand / "latest"
        if latest.is_file():
            return str(cand / latest.read_text().strip())
    return str(p)


def _is_hf(path: str) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "metadata.json").is_file()


def seed_args(cfg: BTXConfig):
    """The dense architecture (LlamaArgs) of the seed and experts, as far as known at plan time
    (the vocabulary is the tokenizer's; data.vocab_size until the data is prepared)."""
    from megatron_btx.models.llama import LlamaArgs

    if cfg.seed.init_from:
        src = cfg.seed.init_from
        if _is_hf(src):
            return LlamaArgs.from_hf_config_file(Path(src) / "config.json")
        from megatron_btx.checkpoint.megatron_io import read_args

        return read_args(_resolve_checkpoint(src))
    fields = dict(cfg.model)
    fields.setdefault("vocab_size", _vocab_size(cfg))
    try:
        return LlamaArgs(
            **{k: v for k, v in fields.items() if k not in ("init_method_std", "spec", "recompute")}
        )
    except TypeError as e:
        raise BTXError(f"{cfg.source or 'config'}: model: {e}") from e


def _vocab_size(cfg: BTXConfig) -> int:
    """Known before any stage runs (so compute-matched step counts never change on re-plan)."""
    if cfg.data.prepared:
        man = Path(cfg.data.prepared) / "manifest.json"
        try:
            return int(json.loads(man.read_text())["tokenizer"]["vocab_size"])
        except (OSError, KeyError, ValueError):
            pass
    if cfg.data.tokenizer:
        try:
            import sentencepiece

            return int(
                sentencepiece.SentencePieceProcessor(model_file=cfg.data.tokenizer).vocab_size()
            )
        except Exception as e:  # noqa: BLE001 - any failure is the user's file
            raise BTXError(f"data.tokenizer={cfg.data.tokenizer}: cannot read it ({e})") from e
    return cfg.data.vocab_size


# ---------------------------------------------------------------------------------------------
# Per-stage training configs
# ---------------------------------------------------------------------------------------------
def _merge_stage(*parts: StageTrain | None) -> StageTrain:
    """Later parts override earlier ones field by field."""
    out = StageTrain()
    for p in parts:
        if p is None:
            continue
        for k in (
            "steps",
            "lr",
            "warmup_steps",
            "min_lr_ratio",
            "micro_batch_size",
            "global_batch_size",
        ):
            if getattr(p, k) is not None:
                setattr(out, k, getattr(p, k))
        if p.nproc != 1:
            out.nproc = p.nproc
        if p.parallel:
            out.parallel = {**(out.parallel or {}), **p.parallel}
        if p.train:
            out.train = {**(out.train or {}), **p.train}
    return out


def _train_config(
    cfg: BTXConfig,
    run: str,
    st: StageTrain,
    data_path: str,
    domains: list[str] | dict[str, float],
    init_from: str | None,
    moe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    train = {"log_interval": 10, "eval_iters": 2, "keep_last": 1, "device": "auto"}
    train.update(cfg.train or {})
    train.update(st.train or {})
    train["steps"] = int(st.steps or 0)
    for k in ("lr", "warmup_steps", "min_lr_ratio"):
        if getattr(st, k) is not None:
            train[k] = getattr(st, k)
    train["warmup_steps"] = min(int(train.get("warmup_steps", 100)), max(train["steps"] // 5, 0))
    train.setdefault("eval_interval", max(train["steps"], 1))
    train.setdefault("save_interval", max(train["steps"] // 4, 1))  # resumable when killed
    train["eval_interval"] = max(1, min(int(train["eval_interval"]), max(train["steps"], 1)))
    data: dict[str, Any] = {
        "path": data_path,
        "domains": domains,
        "valid_domains": cfg.domain_names,
        "seq_length": cfg.data.seq_length,
    }
    if st.micro_batch_size is not None:
        data["micro_batch_size"] = st.micro_batch_size
    if st.global_batch_size is not None:
        data["global_batch_size"] = st.global_batch_size
    model: dict[str, Any]
    if init_from:
        model = {"init_from": init_from}
        for k in ("init_method_std", "spec", "recompute"):
            if k in cfg.model:
                model[k] = cfg.model[k]
    else:
        model = dict(cfg.model)
    d: dict[str, Any] = {
        "run_dir": run,
        "model": model,
        "parallel": dict(st.parallel or {}),
        "data": data,
        "optimizer": dict(cfg.optimizer or {}),
        "train": train,
        "logging": dict(cfg.logging or {}),
    }
    if moe:
        d["moe"] = moe
    from megatron_btx import config as train_config

    c = train_config.Config.from_dict(d, f"{cfg.source or 'btx config'} (stage {run})")
    c.validate(world_size=st.nproc)
    return c.to_dict()


def _tokens(d: dict[str, Any]) -> int:
    return (
        int(d["train"]["steps"])
        * int(d["data"]["global_batch_size"])
        * int(d["data"]["seq_length"])
    )


def _gbs(st: StageTrain) -> int:
    from megatron_btx.config import DataConfig

    return st.global_batch_size or DataConfig().global_batch_size


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
def build_plan(
    config_path_or_obj: Any, run_dir: str | os.PathLike[str] | None = None, write: bool = True
) -> list[Stage]:
    """Stages of the BTX run described by `config_path_or_obj` (YAML path, dict or BTXConfig),
    in a valid execution order. With `write`, saves RUN/btx.yaml, RUN/plan.json and each train
    stage's config under RUN/configs/. `run_dir` overrides the config's."""
    cfg = btx_config.load(config_path_or_obj)
    if run_dir is not None:
        cfg.run_dir = os.fspath(run_dir)
    run = Path(cfg.run_dir).resolve()
    cfg.run_dir = str(run)
    R = str(run)
    names = cfg.domain_names
    stages: list[Stage] = []
    train_cfgs: dict[str, dict[str, Any]] = {}

    # -- data ------------------------------------------------------------------------------
    if cfg.data.prepared:
        data_path = cfg.data.prepared
        man = Path(data_path) / "manifest.json"
        if not man.is_file():
            raise BTXError(f"data.prepared={data_path}: no manifest.json (run btx prepare-data)")
        have = json.loads(man.read_text()).get("domains", {})
        missing = [n for n in names if n not in have]
        if missing:
            raise BTXError(f"data.prepared={data_path} lacks domain(s) {', '.join(missing)}")
        data_deps: list[str] = []
    else:
        data_path = f"{R}/data"
        argv = ["prepare-data", "--output-dir", data_path, "--split", cfg.data.split]
        builtin = [n for n in names if cfg.domain(n).is_builtin]
        if len(builtin) == len(names):
            argv += ["--builtin-domains", ",".join(names), "--max-mb", str(cfg.data.max_mb)]
        else:
            paths: dict[str, list[str]] = {}
            if builtin:  # mixed: fetch the built-in corpora now (they need the network)
                from megatron_btx.data.corpora import fetch_corpora

                got = fetch_corpora(builtin, None, cfg.data.max_mb, None, cfg.data.split)
                paths.update({n: [str(p)] for n, p in got.items()})
            for n in names:
                if n not in paths:
                    paths[n] = cfg.domain(n).paths
            for n in names:
                bad = [p for p in paths[n] if "," in p]
                if bad:
                    raise BTXError(f"domains.{n}: path {bad[0]!r} contains a comma; rename it")
                argv += ["--domain", f"{n}={','.join(paths[n])}"]
            if cfg.data.txt_separator is not None:
                argv += ["--txt-separator", cfg.data.txt_separator]
        if cfg.data.tokenizer:
            argv += ["--tokenizer", cfg.data.tokenizer]
        else:
            argv += ["--vocab-size", str(cfg.data.vocab_size)]
        stages.append(
            Stage(
                "prepare_data",
                "data",
                argv,
                [],
                1,
                [f"{data_path}/manifest.json"],
                workdir=data_path,
                group="shared",
            )
        )
        data_deps = ["prepare_data"]

    weights = cfg.weights()
    blend = {n: w for n, w in weights.items() if w > 0}
    dense_args = seed_args(cfg)
    dense_active = matmul_params(dense_args)

    # -- seed ------------------------------------------------------------------------------
    seed_deps = list(data_deps)
    if cfg.seed.init_from:
        src = cfg.seed.init_from
        if _is_hf(src):
            seed_ckpt = f"{R}/seed_import"
            stages.append(
                Stage(
                    "import_seed",
                    "convert",
                    ["import-hf", "--load", src, "--save", seed_ckpt, "--overwrite"],
                    [],
                    1,
                    [f"{seed_ckpt}/metadata.json"],
                    workdir=seed_ckpt,
                    group="shared",
                )
            )
            seed_deps.append("import_seed")
        else:
            seed_ckpt = _resolve_checkpoint(src)
            if not Path(seed_ckpt, "metadata.json").is_file():
                raise BTXError(f"seed.init_from={src}: not a megatron checkpoint or run dir")
    else:
        st = _merge_stage(cfg.seed.pretrain)
        seed_run = f"{R}/seed"
        d = _train_config(cfg, seed_run, st, data_path, blend, None)
        train_cfgs["seed"] = d
        seed_ckpt = final_checkpoint(seed_run, d["train"]["steps"])
        stages.append(_train_stage("seed", R, d, data_deps, st.nproc, dense_active, "shared"))
        seed_deps = ["seed"]

    # -- experts ---------------------------------------------------------------------------
    expert_ckpts = []
    btx_flops = 0.0
    for n in names:
        st = _merge_stage(cfg.experts)
        erun = f"{R}/experts/{n}"
        d = _train_config(cfg, erun, st, data_path, [n], seed_ckpt)
        train_cfgs[f"expert_{n}"] = d
        s = _train_stage(f"expert_{n}", R, d, seed_deps, st.nproc, dense_active, "btx")
        btx_flops += s.flops
        stages.append(s)
        expert_ckpts.append(final_checkpoint(erun, d["train"]["steps"]))

    # -- merge -----------------------------------------------------------------------------
    n_moe = len(names) + (1 if cfg.merge.seed_as_expert else 0)
    ft = cfg.finetune
    ep = int((ft.parallel or {}).get("ep", 1))
    tp = int((ft.parallel or {}).get("tp", 1))
    pp = int((ft.parallel or {}).get("pp", 1))
    merged = f"{R}/merged"
    argv = ["merge", "--experts", *expert_ckpts]
    if cfg.merge.seed_as_expert:
        argv += ["--seed", seed_ckpt]
    argv += [
        "--save",
        merged,
        "--router-init",
        cfg.merge.router_init,
        "--top-k",
        str(cfg.merge.top_k),
        "--tp",
        str(tp),
        "--ep",
        str(ep),
        "--pp",
        str(pp),
        "--overwrite",
        "--no-progress",
    ]
    if cfg.merge.router_init == "centroid":
        argv += ["--centroid-data", *[f"{data_path}/{n}_train_text_document" for n in names]]
        if cfg.merge.seed_as_expert:
            argv += [f"{data_path}/{n}_train_text_document" for n in names][:1]
    argv += list(cfg.merge.extra_args)
    stages.append(
        Stage(
            "merge",
            "merge",
            argv,
            [f"expert_{n}" for n in names] + seed_deps,
            1,
            [f"{merged}/metadata.json"],
            workdir=merged,
        )
    )

    # -- finetune --------------------------------------------------------------------------
    moe = {
        "aux_loss_coeff": ft.aux_loss_coeff,
        "load_balancing": ft.load_balancing,
        "router": ft.router or {"type": "topk"},
    }
    moe_args = _moe_args(dense_args, n_moe, cfg.merge.top_k)
    moe_active = matmul_params(moe_args)
    st_ft = _merge_stage(ft)
    d = _train_config(cfg, f"{R}/finetune", st_ft, data_path, blend, f"{merged}", moe)
    train_cfgs["finetune"] = d
    s = _train_stage("finetune", R, d, ["merge"], st_ft.nproc, moe_active, "btx")
    btx_flops += s.flops
    stages.append(s)

    eval_deps = ["finetune"] + [f"expert_{n}" for n in names] + seed_deps

    # -- baselines -------------------------------------------------------------------------
    b = cfg.baselines
    if b.dense:
        st = _merge_stage(cfg.experts, b.dense_train)
        if b.compute_match:
            st.steps = _matched_steps(btx_flops, dense_active, _gbs(st), cfg.data.seq_length)
        d = _train_config(cfg, f"{R}/baselines/dense", st, data_path, blend, seed_ckpt)
        train_cfgs["baseline_dense"] = d
        stages.append(
            _train_stage("baseline_dense", R, d, seed_deps, st.nproc, dense_active, "baseline")
        )
        eval_deps.append("baseline_dense")
    if b.sparse_upcycling:
        up = f"{R}/baselines/upcycled"
        argv = [
            "merge",
            "--experts",
            *([seed_ckpt] * n_moe),
            "--save",
            up,
            "--router-init",
            "random",
            "--top-k",
            str(cfg.merge.top_k),
            "--tp",
            str(tp),
            "--ep",
            str(ep),
            "--pp",
            str(pp),
            "--overwrite",
            "--no-progress",
        ]
        stages.append(
            Stage(
                "upcycle_merge",
                "merge",
                argv,
                list(seed_deps),
                1,
                [f"{up}/metadata.json"],
                workdir=up,
                group="baseline",
            )
        )
        st = _merge_stage(ft, b.sparse_upcycling_train)
        if b.compute_match:
            st.steps = _matched_steps(btx_flops, moe_active, _gbs(st), cfg.data.seq_length)
        d = _train_config(
            cfg,
            f"{R}/baselines/sparse_upcycling",
            st,
            data_path,
            blend,
            up,
            {**moe, "router": {"type": "topk"}},
        )
        train_cfgs["baseline_sparse_upcycling"] = d
        stages.append(
            _train_stage(
                "baseline_sparse_upcycling",
                R,
                d,
                ["upcycle_merge"],
                st.nproc,
                moe_active,
                "baseline",
            )
        )
        eval_deps.append("baseline_sparse_upcycling")

    # -- evaluation ------------------------------------------------------------------------
    stages.append(
        Stage(
            "evaluate",
            "eval",
            ["evaluate", "--run-dir", R, "--no-table"],
            eval_deps,
            1,
            [f"{R}/eval/results.json", f"{R}/eval/results.md"],
            workdir=f"{R}/eval",
            group="shared",
        )
    )

    _check(stages)
    if write:
        write_plan(cfg, stages, train_cfgs)
    return stages


def _moe_args(dense, n_experts: int, top_k: int):
    from megatron_btx.models.llama import LlamaArgs

    d = dense.to_dict()
    d.update(num_local_experts=n_experts, num_experts_per_tok=top_k)
    return LlamaArgs.from_dict(d)


def _matched_steps(budget: float, active: int, gbs: int, seq: int) -> int:
    return max(1, int(round(budget / (6.0 * active * gbs * seq))))


def _train_stage(
    name: str, R: str, d: dict[str, Any], deps: list[str], nproc: int, active: int, group: str
) -> Stage:
    path = f"{R}/configs/{name}.yaml"
    steps = int(d["train"]["steps"])
    tokens = _tokens(d)
    return Stage(
        name,
        "train",
        ["train", path],
        list(deps),
        nproc,
        [final_checkpoint(d["run_dir"], steps) + "/metadata.json"],
        True,
        workdir=d["run_dir"],
        steps=steps,
        tokens=tokens,
        active_params=active,
        flops=6.0 * active * tokens,
        group=group,
    )


def _check(stages: list[Stage]) -> None:
    seen: set[str] = set()
    for s in stages:
        if s.kind not in KINDS:
            raise BTXError(f"stage {s.name}: unknown kind {s.kind!r}")
        for d in s.deps:
            if d not in seen:
                raise BTXError(f"stage {s.name} depends on {d!r}, which is not before it")
        if s.name in seen:
            raise BTXError(f"duplicate stage {s.name}")
        seen.add(s.name)


def write_plan(cfg: BTXConfig, stages: list[Stage], train_cfgs: dict[str, dict]) -> None:
    run = Path(cfg.run_dir)
    (run / "configs").mkdir(parents=True, exist_ok=True)
    for name, d in train_cfgs.items():
        _atomic_write(
            run / "configs" / f"{name}.yaml",
            yaml.safe_dump(d, sort_keys=False, default_flow_style=False),
        )
    _atomic_write(run / "btx.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _atomic_write(run / "plan.json", json.dumps([s.to_dict() for s in stages], indent=1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_plan(run_dir: str | os.PathLike[str]) -> list[Stage]:
    p = Path(run_dir) / "plan.json"
    if not p.is_file():
        raise BTXError(f"{run_dir}: no plan.json (not a btx run directory; start it with btx run)")
    return [Stage.from_dict(d) for d in json.loads(p.read_text())]


# ---------------------------------------------------------------------------------------------
# Done markers
# ---------------------------------------------------------------------------------------------
def marker_path(stage: Stage | str, run_dir: str | os.PathLike[str]) -> Path:
    name = stage if isinstance(stage, str) else stage.name
    return Path(run_dir) / "stages" / f"{name}.done"


def outputs_exist(stage: Stage) -> bool:
    return all(os.path.exists(p) for p in stage.outputs)


def stage_done(stage: Stage, run_dir: str | os.PathLike[str]) -> bool:
    """Finished: its done marker exists, names the same command line, and its outputs exist."""
    m = marker_path(stage, run_dir)
    if not m.is_file():
        return False
    try:
        info = json.loads(m.read_text())
    except ValueError:
        return False
    return info.get("argv") == stage.argv and outputs_exist(stage)


def mark_done(stage: Stage, run_dir: str | os.PathLike[str], **info: Any) -> Path:
    """Write the done marker atomically (after checking the outputs)."""
    if not outputs_exist(stage):
        missing = [p for p in stage.outputs if not os.path.exists(p)]
        raise BTXError(f"stage {stage.name}: finished but {missing[0]} does not exist")
    m = marker_path(stage, run_dir)
    m.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "stage": stage.name,
        "kind": stage.kind,
        "argv": stage.argv,
        "steps": stage.steps,
        "tokens": stage.tokens,
        "active_params": stage.active_params,
        "flops": stage.flops,
        "finished_ts": time.time(),
        **info,
    }
    _atomic_write(m, json.dumps(body, indent=1))
    return m


def read_marker(stage: Stage | str, run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    m = marker_path(stage, run_dir)
    try:
        return json.loads(m.read_text())
    except (OSError, ValueError):
        return None


def fmt_flops(x: float) -> str:
    if x <= 0:
        return "-"
    e = int(math.floor(math.log10(x)))
    return f"{x / 10**e:.2f}e{e}"
