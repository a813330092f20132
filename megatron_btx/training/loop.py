"""The training loop: megatron-core DDP, optimizer, pipeline schedules; one code path on CPU/GPU.

One step is megatron-LM's ``train_step``: zero the DDP grad buffers, run
``get_forward_backward_func()`` over the step's microbatches (no pipelining, 1F1B, or interleaved
1F1B, chosen by megatron from PP/VPP), set the learning rate for the step, and
``optimizer.step()`` (gradient all-reduce/reduce-scatter in ``finalize_model_grads``, clipping
and the grad norm inside megatron's optimizer). The MoE load-balancing loss is added by megatron's
MoE layers themselves (``MoEAuxLossAutoScaler`` attaches it to the router output, scaled by the
schedule to ``1/num_microbatches`` like the LM loss); the loop only reads megatron's aux-loss
tracker to log it.

The reported loss of a step is the token-weighted mean LM loss over the whole global batch
(summed on the last pipeline stage over microbatches, all-reduced over data parallel ranks and
sent to every rank), so it does not depend on TP/PP/DP. Its gradient is megatron's: the mean over
microbatches of each microbatch's token-mean, which is the same thing when, as here, every
microbatch has the same number of tokens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_btx import rundir, runtime
from megatron_btx.config import Config
from megatron_btx.errors import BTXError
from megatron_btx.training import checkpointing as ckpt
from megatron_btx.training import mcore_layouts
from megatron_btx.training.bounds import check_sizes
from megatron_btx.training.data import BatchLoader, build_datasets, resolve_sources
from megatron_btx.training.leftovers import snapshot, undo
from megatron_btx.training.logger import MetricsLogger
from megatron_btx.training.model_args import (
    install_router,
    model_variant,
    resolve_model_args,
    router_overrides,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int
    exit_reason: str  # finished | exit_after | signal
    last_loss: float | None
    valid: dict[str, float]
    checkpoint: str | None


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------
class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop agrees on it across ranks at step boundaries."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> PreemptionFlag:
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0 if none): every rank stops at the same step."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron_btx.data.tokenizer import load_tokenizer

        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world)
        p, t = cfg.parallel, cfg.train
        self.sources = resolve_sources(cfg)
        self.tokenizer = load_tokenizer(self.sources.tokenizer)
        self.args = resolve_model_args(
            cfg, self.tokenizer.vocab_size, (self.tokenizer.bos_id, self.tokenizer.eos_id)
        )
        self.variant = model_variant(cfg)
        self.router_cfg = cfg.moe.router_settings(cfg.train.steps)
        cfg.validate_model(self.args)
        # (device cuda without a GPU is refused by runtime.init below, with its own message)
        on_gpu = t.device in ("cuda", "auto") and torch.cuda.is_available()
        dtype = t.dtype if t.dtype != "auto" else ("bf16" if on_gpu else "fp32")
        itemsize = 2 if dtype == "bf16" else 4
        check_sizes(cfg, self.args, world, on_gpu, itemsize, self.variant)  # before building

        # Decide about resuming before the (slow) distributed start-up, so a wrong flag fails fast.
        latest = rundir.read_latest(self.run_dir)
        if t.resume is True and latest is None:
            raise BTXError(f"train.resume is true but {self.run_dir}/checkpoints has no 'latest'")
        if t.resume is False and latest is not None:
            raise BTXError(
                f"{self.run_dir} already has checkpoints (latest: {latest.name}); resume it "
                f"(--resume) or choose another run_dir"
            )
        self.resume_from = latest if t.resume in ("auto", True) else None

        self.rt = runtime.init(
            tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp, device=t.device, seed=t.seed
        )
        self.device = self.rt.device
        self.rank = self.rt.rank
        self.dtype_name = (
            t.dtype
            if t.dtype != "auto"
            else runtime.auto_dtype(self.rt.on_gpu, self.args.hidden_size)
        )
        torch.manual_seed(t.seed)
        if self.rank == 0:
            rundir.clean_stale(self.run_dir)  # a save killed half-way left a temporary folder
        dist.barrier()

        self._build_model()
        self._build_optimizer()
        self.step = 0
        consumed = 0
        self.loaded_from: str | None = None
        optimizer_loaded = False
        if self.resume_from is not None:
            state = self._verified(
                self.resume_from,
                lambda: ckpt.load(self.resume_from, self.model, self.optimizer, self.layout()),
            )
            self.step = int(state.get("step", 0))
            consumed = int(state.get("consumed_samples", 0))
            if "scheduler" in state:
                self.scheduler.load_state_dict(state["scheduler"])
            optimizer_loaded = state["optimizer_loaded"]
            self.loaded_from = str(self.resume_from)
        elif cfg.model.init_from:
            from megatron_btx.checkpoint.megatron_io import load_model

            self._verified(cfg.model.init_from, lambda: load_model(self.model, cfg.model.init_from))
            self.loaded_from = cfg.model.init_from
        if self.loaded_from is not None and not optimizer_loaded:
            # The optimizer's fp32 main parameters were copied from the model when it was built;
            # refresh them from the loaded weights. (Never after loading optimizer state: that
            # holds the exact fp32 main parameters, which bf16 model weights would truncate.)
            self.optimizer.reload_model_params()

        from megatron.core import parallel_state as ps

        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.run_dir / "data_cache"
        self.train_ds, self.valid_ds = build_datasets(cfg, self.sources, cache)
        self.loader = BatchLoader(
            self.train_ds,
            cfg.data.micro_batch_size,
            cfg.data.global_batch_size,
            ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size(),
            self.device,
            consumed_samples=consumed,
            vocab_size=self.args.vocab_size,
        )
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.fwd_bwd = get_forward_backward_func()
        self.logger = MetricsLogger(cfg, self.run_dir, self.rank, resumed_step=self.step)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")

    def _verified(self, folder: str | Path, load):
        """`load()` of the checkpoint `folder`, its files re-hashed meanwhile (unless
        train.verify_hashes is false): :func:`~megatron_btx.training.checkpointing.verified`."""
        return ckpt.verified(folder, load, self.cfg.train.verify_hashes, self.rank, self.device)

    def layout(self) -> dict[str, Any]:
        p = self.cfg.parallel
        return {
            "tp": p.tp,
            "pp": p.pp,
            "ep": p.ep,
            "etp": self.rt.etp,
            "vpp": p.vpp,
            "dp": self.rt.dp,
            "distributed_optimizer": p.distributed_optimizer,
            "moe": self.args.is_moe,
        }

    def _build_model(self) -> None:
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        from megatron_btx.models.llama import MoEOptions, build_model, transformer_config

        cfg, p = self.cfg, self.cfg.parallel
        overrides: dict[str, Any] = {}
        if p.sequence_parallel and p.tp > 1:
            overrides["sequence_parallel"] = True
        if self.args.is_moe:
            overrides.update(router_overrides(self.router_cfg, self.args.num_local_experts))
        overrides.update(mcore_layouts.p2p_overrides(p.pp, p.vpp))
        if self.rt.on_gpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is None:
            # megatron's fused masked softmax is a compiled extension (Megatron-LM/apex build);
            # without it the local spec's attention must use the unfused softmax.
            overrides["masked_softmax_fusion"] = False
        loading = self.resume_from is not None or bool(cfg.model.init_from)
        self.tconf = transformer_config(
            self.args,
            tp=p.tp,
            pp=p.pp,
            ep=p.ep,
            etp=p.etp,
            vpp=p.vpp,
            dtype=self.dtype_name,
            moe=MoEOptions(
                dispatcher=cfg.moe.dispatcher,
                aux_loss_coeff=cfg.moe.aux_loss_coeff,
                load_balancing=cfg.moe.load_balancing,
                capacity_factor=cfg.moe.capacity_factor,
            ),
            recompute=cfg.model.recompute,
            variant=self.variant,
            cpu_init=not self.rt.on_gpu,
            init_method_std=cfg.model.init_method_std,
            perform_initialization=not loading,
            **overrides,
        )
        from megatron_btx.models.speedups import SpeedOptions, compile_layers

        spec = None if cfg.model.spec == "auto" else cfg.model.spec
        speed = SpeedOptions.from_config(cfg)
        chunks = []
        for i in range(p.vpp or 1):
            chunk = build_model(
                self.args, config=self.tconf, vp_stage=i if p.vpp else None, spec=spec, speed=speed
            )
            for param in chunk.parameters():
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            chunks.append(chunk)
        mcore_layouts.route_expert_grads(chunks, ep=p.ep, etp=self.rt.etp, tp=p.tp)
        self.router_name = (
            install_router(chunks, self.router_cfg, self.tconf) if self.args.is_moe else None
        )
        # The BTX routers (when configured) want the step and report routing statistics.
        if self.args.is_moe and self.router_cfg is not None:
            from megatron_btx.models import routers

            self.routers = routers
        else:
            self.routers = None
        if self.rt.on_gpu:
            chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
        if speed.compile:
            compile_layers(chunks)
        if self.tconf.bf16 or self.tconf.fp16:
            chunks = [Float16Module(self.tconf, c) for c in chunks]
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=p.overlap_grad_reduce,
            use_distributed_optimizer=p.distributed_optimizer,
            check_for_nan_in_grad=True,
        )
        self.model = [
            DistributedDataParallel(
                config=self.tconf, ddp_config=self.ddp_config, module=c, disable_bucketing=i > 0
            )
            for i, c in enumerate(chunks)
        ]
        for m in self.model:
            m.broadcast_params()  # every DP replica starts from DP rank 0's weights
        n_local = sum(param.numel() for m in self.model for param in m.parameters())
        self.n_params = self.args.num_params()
        self.n_local_params = n_local

    def _build_optimizer(self) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg, t, o = self.cfg, self.cfg.train, self.cfg.optimizer
        bf16 = self.dtype_name == "bf16"
        oc = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.lr * t.min_lr_ratio,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(oc, self.model)
        decay_steps = max(t.lr_decay_steps or t.steps, t.warmup_steps + 1, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=t.lr,
            min_lr=t.lr * t.min_lr_ratio,
            lr_warmup_steps=t.warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=t.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
        )
        self.tconf.grad_scale_func = self.optimizer.scale_loss
        self.tconf.finalize_model_grads_func = finalize_model_grads
        if cfg.parallel.overlap_grad_reduce:
            nosync = [m.no_sync for m in self.model]
            self.tconf.no_sync_func = nosync[0] if len(nosync) == 1 else nosync

    # ---- one step -------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(self._loss_func, batch["loss_mask"])

    @staticmethod
    def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
        mask = loss_mask.reshape(-1).float()
        loss = torch.sum(output.float().reshape(-1) * mask)
        ntok = mask.sum()
        return loss, ntok.to(torch.int), {"lm": torch.stack([loss.detach(), ntok.detach()])}

    def _run_schedule(self, batch: list[dict[str, torch.Tensor]], forward_only: bool):
        data_cfg = self.cfg.data
        iters = [iter(batch) for _ in self.model]
        return self.fwd_bwd(
            forward_step_func=self._forward_step,
            data_iterator=iters,
            model=self.model,
            num_microbatches=len(batch),
            seq_length=data_cfg.seq_length,
            micro_batch_size=data_cfg.micro_batch_size,
            decoder_seq_length=data_cfg.seq_length,
            forward_only=forward_only,
        )

    def _reduce_loss(self, outputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """(sum, tokens) over the global batch, on every rank."""
        from megatron.core import parallel_state as ps

        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for out in outputs:
                tot += out["lm"].to(torch.float64)
            # TP ranks of the last stage hold the same value: count them once.
            if ps.get_tensor_model_parallel_rank() != 0:
                tot.zero_()
        dist.all_reduce(tot)
        # every (DP, last-stage, TP-rank-0) replica added its share exactly once
        return tot

    def _moe_metrics(self, num_microbatches: int) -> dict[str, float]:
        if not self.args.is_moe:
            return {}
        from megatron.core.transformer.moe import moe_utils

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        out: dict[str, float] = {}
        if tracker:
            moe_utils.reduce_aux_losses_tracker_across_ranks()
            for name in sorted(tracker):
                vals = tracker[name]["values"].float() / num_microbatches
                out[name] = float(vals.mean())
            moe_utils.clear_aux_losses_tracker()
        return out

    def train_step(self) -> dict[str, Any]:
        batch = self.loader.next()
        temperature = None
        if self.routers is not None:
            temperature = self.routers.set_step(self.model, self.step)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            outputs = self._run_schedule(batch, forward_only=False)
            self.scheduler.step(1)  # the lr of step s is the schedule at s (1-based)
            ok, grad_norm, _ = self.optimizer.step()
        except RuntimeError as e:  # megatron-core's check of the gradients (check_for_nan_in_grad)
            text = str(e)
            if "grad" not in text or not ("NaN" in text or "nan" in text or "Inf" in text):
                raise
            first = next((line for line in text.splitlines() if "grad" in line), text)[:200]
            raise BTXError(
                f"the gradients are not finite at step {self.step + 1} ({first.strip()}); lower "
                f"train.lr or check the data"
            ) from e
        tot = self._reduce_loss(outputs)
        metrics = {
            "loss": float(tot[0] / tot[1].clamp(min=1)),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": int(tot[1]),
        }
        if not ok:
            metrics["skipped"] = 1
        if temperature is not None:
            metrics["router_temperature"] = float(temperature)
        metrics.update(self._moe_metrics(len(batch)))
        return metrics

    def routing_stats(self) -> dict[str, Any]:
        """Per-layer expert load and router entropy from the BTX routers since the last call
        (``router_*``), and the attention experts' routing weights and entropy
        (``attention_router_*``), summed over data-parallel ranks and gathered over pipeline
        stages (all ranks call)."""
        from megatron.core import parallel_state as ps

        from megatron_btx.models import attention_experts

        group = ps.get_data_parallel_group()
        stats: dict[str, dict[int, dict[str, Any]]] = {}
        if self.routers is not None:
            stats["router"] = self.routers.routing_stats(self.model, reset=True, group=group)
        if self.variant.attention_experts:
            # with sequence parallelism each TP rank routes its own slice of the tokens
            sp = self.tconf.sequence_parallel
            every = ps.get_tensor_and_data_parallel_group() if sp else group
            stats["attention_router"] = attention_experts.routing_stats(self.model, group=every)
        if not stats:
            return {}
        if ps.get_pipeline_model_parallel_world_size() > 1:
            parts: list[Any] = [None] * ps.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(parts, stats, group=ps.get_pipeline_model_parallel_group())
            stats = {k: {i: v for part in parts for i, v in part[k].items()} for k in stats}
        out: dict[str, Any] = {}
        for name, per_layer in stats.items():
            entropies = []
            for layer in sorted(per_layer):
                layer_stats = per_layer[layer]
                for key, val in layer_stats.items():
                    if isinstance(val, torch.Tensor):
                        val = val.tolist()
                    out[f"{name}_{key}_l{layer}"] = val
                if isinstance(layer_stats.get("entropy"), (int, float)):
                    entropies.append(float(layer_stats["entropy"]))
            if entropies:
                out[f"{name}_entropy"] = sum(entropies) / len(entropies)
        return out

    # ---- validation -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        from megatron_btx.models import attention_experts

        data_cfg, train_cfg = self.cfg.data, self.cfg.train
        for m in self.model:
            m.eval()
        out: dict[str, float] = {}
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for name, ds in self.valid_ds.items():
                loader = BatchLoader(
                    ds,
                    data_cfg.micro_batch_size,
                    data_cfg.global_batch_size,
                    self.loader.dp_rank,
                    self.loader.dp_size,
                    self.device,
                    vocab_size=self.args.vocab_size,
                )
                iters = min(train_cfg.eval_iters, max(1, len(ds) // data_cfg.global_batch_size))
                acc = torch.zeros(2, dtype=torch.float64, device=self.device)
                for i in range(iters):
                    outputs = self._run_schedule(
                        loader.batch_at(i * data_cfg.global_batch_size), True
                    )
                    acc += self._reduce_loss(outputs)
                out[name] = float(acc[0] / acc[1].clamp(min=1))
                total += acc
        for m in self.model:
            m.train()
        if self.args.is_moe:
            from megatron.core.transformer.moe import moe_utils

            moe_utils.clear_aux_losses_tracker()
            if self.routers is not None:
                self.routers.reset_stats(self.model)
            attention_experts.reset_stats(self.model)
        if out:
            out["all"] = float(total[0] / total[1].clamp(min=1))
        return out

    # ---- checkpoints ----------------------------------------------------------------------
    def save(self, reason: str) -> Path:
        from megatron_btx.checkpoint.families import to_hf

        t0 = time.perf_counter()
        train_state = {
            "step": self.step,
            "consumed_samples": self.loader.consumed_samples,
            "layout": self.layout(),
        }
        from megatron_btx.checkpoint.manifest import Manifest

        record = Manifest(
            kind="megatron_torch_dist",
            model=self.args.to_dict(),
            moe=self.variant.to_manifest(),
            dtype=self.dtype_name,
            layout=self.layout(),
            padded_vocab_size=self.args.padded_vocab_size,
            tokenizer={
                "files": sorted(self.tokenizer.files()),
                "sha256": self.tokenizer.sha256,
                "kind": self.tokenizer.kind,
                "eos_id": self.tokenizer.eos_id,
            },
            training={
                "run_dir": str(self.run_dir.resolve()),
                "step": self.step,
                "consumed_samples": self.loader.consumed_samples,
                "init_from": self.cfg.model.init_from,
                "data": [[p, w] for p, w in self.sources.blend],
                "router": self.router_name,
            },
        )
        folder = ckpt.save(
            run_dir=self.run_dir,
            step=self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_state=train_state,
            record=record,
            tokenizer=self.sources.tokenizer,
            files={
                "config.yaml": self.cfg.to_yaml(),
                "hf_config.json": json.dumps(to_hf(self.args), indent=2),
            },
            keep_last=self.cfg.train.keep_last,
        )
        dt = time.perf_counter() - t0
        self.logger.event(
            "checkpoint", self.step, path=str(folder), reason=reason, seconds=round(dt, 3)
        )
        self.logger.console(f"saved checkpoint {folder} ({reason}, {dt:.1f}s)")
        self.last_saved = self.step
        self.saved = getattr(self, "saved", 0) + 1
        return folder

    # ---- the loop -------------------------------------------------------------------------
    def describe(self) -> str:
        arch, par = self.args, self.cfg.parallel
        kind = (
            f"MoE {arch.num_local_experts} experts top-{arch.num_experts_per_tok} "
            f"({self.router_name} router)"
            if arch.is_moe
            else "dense"
        )
        if self.variant.attention_experts:
            kind += (
                f", {self.variant.attention_experts} attention experts ({self.variant.attention})"
            )
        from megatron_btx.models.specs import chosen_spec

        spec = chosen_spec(None if self.cfg.model.spec == "auto" else self.cfg.model.spec)
        return (
            f"model: Llama {kind}, {arch.num_hidden_layers} layers, hidden {arch.hidden_size}, "
            f"{self.n_params / 1e6:.2f}M params, vocab {arch.vocab_size} (padded "
            f"{arch.padded_vocab_size})\n"
            f"layout: TP={par.tp} PP={par.pp} VPP={par.vpp or 1} EP={par.ep} ETP={self.rt.etp} "
            f"DP={self.rt.dp} on {self.rt.world_size} {self.device.type} process(es), "
            f"{self.dtype_name}, {spec} layer spec, "
            f"{'distributed' if par.distributed_optimizer else 'regular'} optimizer, "
            f"schedule {self.fwd_bwd.__name__}"
            f"{', sequence parallel' if self.tconf.sequence_parallel else ''}\n"
            f"data: {self.sources.describe()}; {len(self.train_ds)} train samples of "
            f"{self.cfg.data.seq_length} tokens; validation on {', '.join(self.valid_ds) or '-'}"
        )

    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        self.last_saved = self.step if self.resume_from is not None else -1
        start_step = self.step
        if self.loaded_from:
            self.logger.console(f"loaded {self.loaded_from} (step {self.step})")
        self.logger.console(self.describe())
        self.logger.event(
            "start",
            self.step,
            resumed=self.resume_from is not None,
            world_size=self.rt.world_size,
            threads=torch.get_num_threads(),
            device=self.device.type,
            layout=self.layout(),
            params=self.n_params,
        )
        stop_at = t.steps if t.exit_after is None else min(t.steps, t.exit_after)
        valid: dict[str, float] = {}
        last_loss = None
        reason = "finished"
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_length

        if self.step == 0 and self.valid_ds and stop_at > 0:
            valid = self.evaluate()
            self._log_eval(valid)
        window: list[dict[str, Any]] = []
        run_t0 = time.perf_counter()
        with PreemptionFlag() as flag:
            while self.step < stop_at:
                step_t0 = time.perf_counter()
                metrics = self.train_step()
                # the step alone: logging, validation and checkpoints are not training time
                metrics["step_seconds"] = time.perf_counter() - step_t0
                self.step += 1
                last_loss = metrics["loss"]
                window.append(metrics)
                if not math.isfinite(last_loss):
                    raise BTXError(
                        f"loss is {last_loss} at step {self.step}; lower train.lr or check data"
                    )
                if self.step % t.log_interval == 0 or self.step == stop_at:
                    now = time.perf_counter()
                    avg = {
                        k: sum(w[k] for w in window) / len(window)
                        for k in window[0]
                        if isinstance(window[0][k], float)
                    }
                    avg["lr"] = metrics["lr"]
                    avg["seconds_per_step"] = avg.pop("step_seconds")
                    avg["tokens_per_s"] = tokens_per_step / max(avg["seconds_per_step"], 1e-9)
                    avg["consumed_samples"] = self.loader.consumed_samples
                    avg.update(self.routing_stats())
                    self.logger.event("train", self.step, **avg)
                    self.logger.train_line(
                        self.step, t.steps, avg, now - run_t0, self.step - start_step
                    )
                    window = []
                if self.step % t.eval_interval == 0 or self.step == stop_at:
                    if self.valid_ds:
                        valid = self.evaluate()
                        self._log_eval(valid)
                sig = flag.agreed(self.device)
                if sig:
                    reason = "signal"
                    self.logger.console(
                        f"received {signal.Signals(sig).name}: saving a checkpoint at step "
                        f"{self.step} and exiting"
                    )
                    self.save(f"signal {signal.Signals(sig).name}")
                    break
                if self.step % t.save_interval == 0 and self.step < stop_at:
                    self.save("interval")
        if reason != "signal":
            if self.step < t.steps:
                reason = "exit_after"
            if self.last_saved != self.step:
                self.save("final" if reason == "finished" else reason)
        self.logger.event("end", self.step, reason=reason, loss=last_loss, valid=valid)
        self.logger.console(f"training stopped at step {self.step} ({reason})")
        self.logger.close()
        latest = rundir.read_latest(self.run_dir)
        return TrainResult(self.step, reason, last_loss, valid, str(latest) if latest else None)

    def _log_eval(self, valid: dict[str, float]) -> None:
        self.logger.event("eval", self.step, **{f"loss_{k}": v for k, v in valid.items()})
        parts = " | ".join(f"{k} {v:.4f}" for k, v in valid.items())
        self.logger.console(f"validation at step {self.step}: {parts}")


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training described by `cfg` in this process group; tears the
    runtime down afterwards. A run that fails before it saved a checkpoint leaves its run
    directory as it found it (:func:`~megatron_btx.training.leftovers.undo`, on rank 0)."""
    trainer = Trainer(cfg)
    run_dir = Path(cfg.run_dir)
    before = snapshot(run_dir)
    try:
        trainer.setup()
        return trainer.run()
    except BaseException:
        if getattr(trainer, "saved", 0) == 0 and int(os.environ.get("RANK", "0")) == 0:
            logger = getattr(trainer, "logger", None)
            if logger is not None:
                logger.close()
            undo(run_dir, before)
        raise
    finally:
        try:
            runtime.teardown()
        except Exception:  # pragma: no cover - never mask the real error
            pass
