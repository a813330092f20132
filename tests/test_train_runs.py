"""The training loop end to end, one process: learning on real text, exact resume after kill -9,
a kill inside a checkpoint save, SIGTERM preemption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402


def test_loss_falls_on_code(tmp_path, data):
    """A small dense Llama on the built-in code corpus: validation loss falls by >= 1 nat in a
    CPU budget of seconds; validation is reported per domain; logs land in all sinks."""
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        data,
        data={
            "domains": {"code": 1.0},
            "valid_domains": ["code", "toy"],
            "seq_length": 128,
            "micro_batch_size": 8,
            "global_batch_size": 8,
        },
        train={
            "steps": 40,
            "eval_interval": 20,
            "eval_iters": 4,
            "log_interval": 10,
            "save_interval": 20,
            "keep_last": 1,
        },
        logging={"tensorboard": True},
    )
    proc = tc.check(tc.run(cfg))
    evals = tc.records(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [0, 20, 40]
    first, last = evals[0], evals[-1]
    assert first["loss_code"] - last["loss_code"] >= 1.0, (first, last)
    assert {"loss_code", "loss_toy", "loss_all"} <= set(last)
    # console progress line with the promised fields
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("step     40/40"))
    for field in ("loss", "lr", "grad_norm", "tok/s", "ETA"):
        assert field in line
    train = tc.records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    # lr: linear warmup over 3 steps, then cosine to 10% at step 40
    assert train[-1]["lr"] == pytest.approx(3e-4)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    # keep_last 1: only the final checkpoint stays; it is a complete, self-describing one
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["iter_0000040", "latest"]
    m = json.loads((tmp_path / "run/checkpoints/iter_0000040/btx_manifest.json").read_text())
    assert m["step"] == 40 and m["layout"]["tp"] == 1 and m["model"]["hidden_size"] == 64
    assert (tmp_path / "run/checkpoints/iter_0000040/tokenizer/tokenizer.model").is_file()


def test_kill9_then_resume_matches_and_sigterm_saves(tmp_path, base, data):
    """kill -9 a run after a checkpoint; resume: every step after the checkpoint has the loss of
    the killed run. Then SIGTERM the resumed run: it saves a checkpoint and exits 0."""
    init = tc.init_checkpoint(base, data)
    run_dir = tmp_path / "run"
    # Checkpoints every 6 steps; the kill lands 1-2 steps after one, far from the next save.
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        run_dir,
        data,
        model=dict(tc.MODEL, init_from=str(init)),
        data={"seq_length": 128},
        train={"steps": 1000, "save_interval": 6, "keep_last": 2},
    )

    killed, resumed_from, after = tc.kill_just_after_a_checkpoint(
        cfg, run_dir, tmp_path / "run1.log"
    )

    p2 = tc.start(cfg, log=tmp_path / "run2.log")
    try:
        tc.wait_for(
            lambda: max(tc.losses(run_dir)) > max(killed) + 1,
            180,
            p2,
            "the resumed run to pass the killed run",
        )
    finally:
        rc = tc.stop(p2, signal.SIGTERM, timeout=120)
    log2 = (tmp_path / "run2.log").read_text()
    assert rc == 0, log2[-3000:]
    assert f"loaded {run_dir}/checkpoints/iter_{resumed_from:07d}" in log2
    resumed = tc.losses(run_dir)  # the resumed run's records come last and win
    for s in after:
        assert abs(resumed[s] - killed[s]) <= 1e-6, (s, resumed[s], killed[s])
    end = tc.records(run_dir, "end")[-1]
    assert end["reason"] == "signal"
    assert tc.latest(run_dir) == f"iter_{end['step']:07d}"
    assert tc.records(run_dir, "checkpoint")[-1]["reason"] == "signal SIGTERM"


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, base, data):
    """SIGKILL in the middle of writing checkpoint 4 (tensors written, folder not yet renamed):
    `latest` still names checkpoint 2, which loads; the resumed run's losses equal the
    uninterrupted reference run's."""
    _, ref_dir = tc.reference_run(base, data)
    init = tc.init_checkpoint(base, data)
    run_dir = tmp_path / "run"
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        run_dir,
        data,
        model=dict(tc.MODEL, init_from=str(init)),
        train={"save_interval": 2, "keep_last": 5},
    )
    fault = str(Path(__file__).parent / "dist" / "fault")  # sitecustomize: SIGKILL in the save
    proc = tc.run(
        cfg,
        BTX_TEST_KILL_IN_SAVE="4",
        PYTHONPATH=os.pathsep.join([fault, str(tc.ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / ".iter_0000004.tmp").is_dir()  # the half-written save
    assert not (ckpts / "iter_0000004").exists()
    assert tc.latest(run_dir) == "iter_0000002"
    proc = tc.check(tc.run(cfg))
    assert f"loaded {ckpts}/iter_0000002 (step 2)" in proc.stdout
    assert not (ckpts / ".iter_0000004.tmp").exists()  # stale temporary folder removed
    ref = tc.losses(ref_dir)
    got = tc.losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])


def test_exit_after_and_resume_flags(tmp_path, base, data):
    """train.exit_after stops with a checkpoint, keeping the schedule of train.steps; --no-resume
    refuses to overwrite a run; --resume without a checkpoint is an error."""
    cfg = tc.write_config(
        tmp_path / "c.yaml", tmp_path / "run", data, train={"steps": 6, "exit_after": 2}
    )
    tc.check(tc.run(cfg))
    assert tc.latest(tmp_path / "run") == "iter_0000002"
    assert tc.records(tmp_path / "run", "end")[-1]["reason"] == "exit_after"
    proc = tc.run(cfg, ["--no-resume"])
    assert proc.returncode == 2 and "already has checkpoints" in proc.stderr
    shutil.rmtree(tmp_path / "run")
    proc = tc.run(cfg, ["--resume"])
    assert proc.returncode == 2 and "no 'latest'" in proc.stderr


def test_init_from_converted_hf_checkpoint(tmp_path, data):
    """model.init_from a checkpoint converted from HF (GQA Llama): the architecture comes from
    its manifest, the weights are loaded, the optimizer starts fresh, and the start-of-training
    validation loss is the converted model's, not a random model's (ln 1024 = 6.93)."""
    import subprocess

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=128,
        )
    )
    with torch.no_grad():  # a recognisable function: strongly prefer token 7 everywhere
        hf.lm_head.weight.zero_()
        hf.lm_head.bias = None
        hf.lm_head.weight[7] = 1.0
        hf.model.norm.weight.fill_(50.0)
    hf.save_pretrained(tmp_path / "hf")
    conv = subprocess.run(
        [
            sys.executable,
            str(tc.ROOT / "tools/convert_hf_to_megatron.py"),
            "--load",
            str(tmp_path / "hf"),
            "--save",
            str(tmp_path / "mg"),
        ],
        env=tc.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert conv.returncode == 0, conv.stderr[-3000:]
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        data,
        model={"init_from": str(tmp_path / "mg")},
        train={"steps": 2, "eval_interval": 2},
    )
    proc = tc.check(tc.run(cfg))
    assert f"loaded {tmp_path / 'mg'} (step 0)" in proc.stdout
    first = tc.records(tmp_path / "run", "eval")[0]
    assert first["step"] == 0 and first["loss_code"] > 8.0, first  # far from ln(1024)
    m = json.loads((tmp_path / "run/checkpoints/iter_0000002/btx_manifest.json").read_text())
    assert m["model"]["num_key_value_heads"] == 2
    assert m["training"]["init_from"] == str(tmp_path / "mg")


@pytest.mark.long
def test_example_small_dense_learns(tmp_path):
    """The shipped example (the default small budget) on the built-in code corpus, unchanged but
    for its run and data directories: validation loss falls by >= 1 nat."""
    from megatron_btx.data.corpora import fetch_corpora
    from megatron_btx.data.domains import prepare_domains

    data = tmp_path / "data"
    prepare_domains({"code": [fetch_corpora(["code"])["code"]]}, data, vocab_size=8000)
    proc = tc.check(
        tc.run(
            Path(tc.ROOT) / "examples" / "small_dense.yaml",
            ["--run_dir", str(tmp_path / "run"), "--data.path", str(data)],
            timeout=900,
            OMP_NUM_THREADS="2",
        )
    )
    evals = tc.records(tmp_path / "run", "eval")
    assert evals[0]["loss_code"] - evals[-1]["loss_code"] >= 1.0, proc.stdout[-2000:]
