"""Shared pieces of the training tests: prepared data, configs, and running `btx train` in
subprocesses (one process, or several under torchrun with gloo).

Training always runs in a child process: megatron_btx.runtime applies its CPU adjustments to
torch globally, which must not leak into the pytest process. Artefacts that several tests share
(the prepared data, initial checkpoints, the reference run) live under pytest's session base
temp and are made once per session even when two test modules ask for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]

#: The small model all parallel/resume tests use: 2 layers so PP=2 has one layer per stage,
#: 4 heads so TP=2 splits them, vocab 1024 from the tokenizer.
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    # 2 cores: one thread per process, or two processes thrash each other.
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
             PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""))
    e.pop("BTX_TEST_KILL_IN_SAVE", None)
    e.update(extra)
    return e


def command(config: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_btx.training", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "megatron_btx.training", str(config),
            *overrides]


def run(config: Path, overrides: list[str] | None = None, nproc: int = 1, timeout: int = 240,
        **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(config, overrides or [], nproc), cwd=ROOT, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def start(config: Path, overrides: list[str] | None = None, log: Path | None = None,
          **extra_env: str) -> subprocess.Popen:
    """A background one-process run; output goes to `log` (a file, never a pipe we must drain)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(command(config, overrides or []), cwd=ROOT, env=env(**extra_env),
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.log_path = log  # wait_for quotes its tail when the run dies early
    return proc


# ---- data ---------------------------------------------------------------------------------------
def prepare_data(base: Path) -> Path:
    """The built-in code corpus plus a small synthetic 'toy' domain, one 1024-token tokenizer.

    prepare_domains is idempotent (it skips work when its manifest matches), so calling this
    again in the same session costs a manifest check."""
    from megatron_btx.data.corpora import fetch_corpora
    from megatron_btx.data.domains import prepare_domains

    out = base / "btx_train_data"
    if (out / "manifest.json").is_file():
        return out
    code = fetch_corpora(["code"])["code"]
    toy = base / "toy.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with open(toy, "w") as f:
        for i in range(400):
            text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(120)) + ".\n"
            f.write(json.dumps({"id": f"toy-{i}", "text": text}) + "\n")
    prepare_domains({"code": [code], "toy": [toy]}, out, vocab_size=1024,
                    split={"valid": 0.05, "test": 0.02})
    return out


# ---- configs ------------------------------------------------------------------------------------
def write_config(path: Path, run_dir: Path, data_dir: Path, moe: bool = False,
                 **sections: Any) -> Path:
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": dict(MODEL, **(MOE if moe else {})),
        "data": {"path": str(data_dir), "domains": ["code"], "seq_length": 64,
                 "micro_batch_size": 2, "global_batch_size": 8,
                 "cache_dir": str(data_dir / "index_cache")},
        "train": {"steps": 8, "lr": 3e-3, "warmup_steps": 3, "eval_interval": 1000,
                  "eval_iters": 1, "save_interval": 1000, "log_interval": 1},
        "logging": {"tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and section != "model":  # a model section is given whole
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- results ------------------------------------------------------------------------------------
def records(run_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
        if event is None or rec["event"] == event:
            out.append(rec)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the train events (the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in records(run_dir, "train")}


def latest(run_dir: Path) -> str | None:
    p = Path(run_dir) / "checkpoints" / "latest"
    return p.read_text().strip() if p.is_file() else None


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None,
             what: str = "condition") -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            log = getattr(proc, "log_path", None)
            tail = Path(log).read_text()[-3000:] if log and Path(log).is_file() else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}\n{tail}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
    """Send `sig` to the process we started (by its pid) and wait for it."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    return proc.wait(timeout=timeout)


# ---- shared runs ---------------------------------------------------------------------------------
def init_checkpoint(base: Path, data: Path, moe: bool = False) -> Path:
    """A step-0 checkpoint (train.steps 0) every layout starts from, so all layouts begin with
    identical weights (a model built at PP=2 would draw its initial weights differently)."""
    name = "init_moe" if moe else "init_dense"
    run_dir = base / name
    ckpt = run_dir / "checkpoints" / "iter_0000000"
    if not (ckpt / "btx_manifest.json").is_file():
        cfg = write_config(base / f"{name}.yaml", run_dir, data, moe=moe, train={"steps": 0})
        check(run(cfg))
    return ckpt


def reference_run(base: Path, data: Path, moe: bool = False) -> tuple[Path, Path]:
    """(config, run_dir) of the uninterrupted one-process run of 8 steps from the initial
    checkpoint, saving at steps 4 and 8 (its checkpoint 4 seeds the resharded-resume tests)."""
    name = "ref_moe" if moe else "ref_dense"
    init = init_checkpoint(base, data, moe)
    cfg = write_config(base / f"{name}.yaml", base / name, data, moe=moe,
                       model=dict(MODEL, **(MOE if moe else {}), init_from=str(init)),
                       train={"save_interval": 4, "keep_last": 3})
    if not any(r["event"] == "end" for r in records(base / name)):
        check(run(cfg))
    return cfg, base / name


def seed_only_run(tmp_path: Path, data: Path, seed: Path) -> Path:
    """A run directory whose plan holds only the seed (checkpoint `seed`), for `btx evaluate`."""
    run = tmp_path / "run"
    run.mkdir()
    config = {
        "run_dir": str(run),
        "data": {"prepared": str(data), "seq_length": 64},
        "domains": {"code": "builtin"},
        "seed": {"init_from": str(seed)},
        "experts": {"steps": 1},
        "finetune": {"steps": 1},
        "evaluation": {"tokens_per_domain": 256, "btm_top_k": [1]},
    }
    (run / "btx.yaml").write_text(yaml.safe_dump(config))
    model = {"name": "seed", "kind": "dense", "role": "rival", "part": "seed"}
    plan = {
        "format_version": 3,
        "seed_checkpoint": str(seed),
        "stages": [],
        "models": [{**model, "checkpoint": str(seed)}],
    }
    (run / "plan.json").write_text(json.dumps(plan))
    return run



def kill_just_after_a_checkpoint(cfg: Path, run_dir: Path, log: Path) -> tuple[dict[int, float], int, list[int]]:
    """Start a run, SIGKILL it one or two steps after a checkpoint; return the killed run's
    losses (step -> loss), the step of the checkpoint a resume starts from, and the logged steps
    after it (asserted not empty: else there is nothing to compare)."""

    def just_after_a_checkpoint() -> bool:
        saved = [r["step"] for r in records(run_dir, "checkpoint")]
        done = max(losses(run_dir), default=0)
        return bool(saved) and saved[-1] + 1 <= done

    proc = start(cfg, log=log)
    try:
        wait_for(just_after_a_checkpoint, 180, proc, "a checkpoint and one more step")
    finally:
        rc = stop(proc, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    killed = losses(run_dir)
    resumed_from = int(latest(run_dir).split("_")[1])
    after = [s for s in killed if s > resumed_from]
    assert after, ("the kill landed right after a save; nothing to compare", sorted(killed))
    return killed, resumed_from, after
