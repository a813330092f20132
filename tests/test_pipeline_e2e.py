"""End to end: `btx run` on a tiny config whose domains are folders of text files: every stage
runs for real (data, seed pretraining, experts, merge, finetune, dense and sparse-upcycling
baselines, evaluation with BTM). The run is SIGKILLed (whole process group) once the first
expert is done; re-running must finish it without redoing any finished stage. About 2 minutes on
2 cores."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_btx.pipeline import local, plan

ROOT = Path(__file__).resolve().parents[1]

WORDS = {
    "code": "def return self if else for in range import class lambda yield none true false "
    "print len list dict".split(),
    "math": "theorem lemma proof integer prime sum equals implies forall exists group ring "
    "field zero one".split(),
    "prose": "the a river morning bright walked quietly under old tree she he garden light "
    "wind story".split(),
}
SEPS = {
    "code": ["(", ")", ":", "\n    ", " = ", ", "],
    "math": [" + ", " = ", " ; ", "\n"],
    "prose": [" ", " ", ", ", ". ", "\n"],
}


def make_text_domains(root: Path, n_files: int = 30, words: int = 300) -> dict[str, Path]:
    """Three domains of plain .txt files (one document per file), distinct vocabularies."""
    rng = random.Random(0)
    out = {}
    for d, ws in WORDS.items():
        folder = root / d
        folder.mkdir(parents=True)
        for i in range(n_files):
            parts = []
            for _ in range(words):
                parts += [rng.choice(ws), rng.choice(SEPS[d])]
            (folder / f"doc{i:03d}.txt").write_text("".join(parts))
        out[d] = folder
    return out


#: the tiny Llama of the pipeline tests (also test_pipeline_plan's and test_pipeline_variants')
TINY_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
}


def tiny_config(tmp_path: Path) -> Path:
    doms = make_text_domains(tmp_path / "text")
    small = {"micro_batch_size": 4, "global_batch_size": 4}
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"vocab_size": 300, "split": "test=0.15,valid=0.1", "seq_length": 64},
        "domains": {n: {"source": str(p)} for n, p in doms.items()},
        "model": dict(TINY_MODEL),
        "seed": {"pretrain": {"steps": 8, "lr": 3e-3, "warmup_steps": 1, **small}},
        "experts": {"steps": 6, "lr": 2e-3, "warmup_steps": 1, **small},
        "finetune": {"steps": 4, "lr": 2e-3, "warmup_steps": 1, **small},
        "evaluation": {"tokens_per_domain": 256, "micro_batch_size": 4},
        "train": {"log_interval": 2, "eval_iters": 1},
    }
    p = tmp_path / "tiny_btx.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")


def _btx(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_btx", *args]


def _tree_mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def reference_losses(checkpoint: str, run: Path, hf_dir: Path) -> dict[str, float]:
    """Per-domain mean loss of a checkpoint's HF export, computed by transformers, on the
    evaluation's windows and scored tokens."""
    import torch
    import transformers

    from megatron_btx.checkpoint.convert import megatron_to_hf
    from megatron_btx.eval import data as edata
    from megatron_btx.pipeline import config as btx_config

    cfg = btx_config.load(yaml.safe_load((run / "btx.yaml").read_text()))
    megatron_to_hf(checkpoint, hf_dir, dtype="fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    ev = cfg.evaluation
    losses = {}
    for domain in cfg.domain_names:
        held_out = edata.eval_set(
            str(run / "data"),
            domain,
            ev.split,
            cfg.data.seq_length,
            ev.tokens_per_domain,
            ev.btm_route_tokens,
        )
        windows = torch.from_numpy(held_out.windows)
        with torch.no_grad():
            logits = model(windows[:, :-1]).logits.float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, windows[:, 1:, None])[..., 0]
        losses[domain] = float(-held_out.select(logprobs.double().numpy()).mean())
    return losses


@pytest.mark.long
def test_btx_run_end_to_end_killed_and_resumed(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    stages_dir = run / "stages"

    # -- 1. start, and SIGKILL everything once the first expert is done ---------------------
    with open(tmp_path / "run1.log", "w") as log:
        proc = subprocess.Popen(
            _btx("run", str(cfg), "--parallel", "2"),
            cwd=tmp_path,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 240
        try:
            while time.time() < deadline and proc.poll() is None:
                if list(stages_dir.glob("expert_*.done")):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert list(stages_dir.glob("expert_*.done")), "no expert finished in time"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done_before = {p.stem: json.loads(p.read_text()) for p in stages_dir.glob("*.done")}
    experts_done = [n for n in done_before if n.startswith("expert_")]
    assert experts_done and "evaluate" not in done_before
    ckpts_before = {
        n: _tree_mtimes(run / "experts" / n[len("expert_") :] / "checkpoints") for n in experts_done
    }

    st = subprocess.run(
        _btx("status", str(run)), env=_env(), capture_output=True, text=True, timeout=60
    )
    assert st.returncode == 0, st.stderr
    assert "done" in st.stdout and ("pending" in st.stdout or "interrupted" in st.stdout)

    # -- 2. re-run: finishes, without redoing what was done --------------------------------
    r = subprocess.run(
        _btx("run", str(cfg), "--parallel", "2"),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "already done: " in r.stdout
    for n, info in done_before.items():
        after = json.loads((stages_dir / f"{n}.done").read_text())
        assert after["finished_ts"] == info["finished_ts"], f"{n} was redone"
        assert f"start {n} " not in r.stdout
    for n, mt in ckpts_before.items():
        assert _tree_mtimes(run / "experts" / n[len("expert_") :] / "checkpoints") == mt

    # -- 3. every stage's outputs and the table ---------------------------------------------
    stages = plan.read_plan(run)
    assert local.done_stages(stages, run) == {s.name for s in stages}
    for s in stages:
        assert plan.outputs_exist(s), s.name
        m = plan.read_marker(s, run)
        assert m["seconds"] > 0
        if s.kind == "train":
            assert m["flops"] == 6 * s.active_params * s.tokens > 0
    res = json.loads((run / "eval" / "results.json").read_text())
    want = {
        "seed",
        "expert_code",
        "expert_math",
        "expert_prose",
        "dense",
        "btm_top1",
        "btm_top2",
        "sparse_upcycling",
        "btx_merge_only",
        "btx",
    }
    assert set(res["models"]) == want
    # the evaluator's per-domain losses are transformers' losses of each model's HF export over
    # the same windows and scored tokens (fp32; megatron and transformers agree to ~1e-6)
    by_name = {s.name: s for s in stages}
    checkpoints = {
        "seed": plan.read_plan_file(run).seed_checkpoint,
        "expert_code": by_name["expert_code"].checkpoint,
        "dense": by_name["baseline_dense"].checkpoint,
        "btx": by_name["finetune"].checkpoint,
    }
    for name, ckpt in checkpoints.items():
        want_loss = reference_losses(ckpt, run, tmp_path / "hf" / name)
        for d, loss in want_loss.items():
            assert res["models"][name]["loss"][d] == pytest.approx(loss, rel=1e-5), (name, d)
    # training helps: every trained model beats the barely trained seed on average
    for name in want - {"seed", "btx_merge_only"}:
        assert res["models"][name]["mean"] < res["models"]["seed"]["mean"], name
    # compute matching: dense and sparse upcycling within half a step of the BTX budget
    btx_flops = res["models"]["btx"]["train_flops"]
    for b, stage in (
        ("dense", "baseline_dense"),
        ("sparse_upcycling", "baseline_sparse_upcycling"),
    ):
        per_step = by_name[stage].flops / by_name[stage].steps
        assert abs(res["models"][b]["train_flops"] - btx_flops) <= per_step / 2 + 1, b
    # merge diagnostics: every expert moved away from the seed; retention per domain
    diag = res["diagnostics"]
    assert set(diag["drift"]["attention"]) == {"code", "math", "prose"}
    assert all(v > 0 for v in diag["drift"]["attention"].values())
    assert set(diag["retention"]) == {"code", "math", "prose"}
    assert (run / "eval" / "diagnostics.png").is_file()
    md = (run / "eval" / "results.md").read_text()
    assert "## Merge diagnostics" in md
    assert "| btx |" in md and "| btm_top2 |" in md and "claims" in md
    rt = json.loads((run / "eval" / "routing.json").read_text())
    for d in ("code", "math", "prose"):
        layers = rt["btx"][d]
        assert sorted(layers) == ["0", "1"]
        assert abs(sum(layers["0"]["load"]) - 1) < 1e-6 and len(layers["0"]["load"]) == 4
    assert (run / "eval" / "routing.png").is_file()
    assert "# BTX evaluation" in r.stdout  # the run ends with the table

    # -- 4. a third run has nothing to do ---------------------------------------------------
    r3 = subprocess.run(
        _btx("run", str(cfg)), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert r3.returncode == 0 and "nothing to do" in r3.stdout
