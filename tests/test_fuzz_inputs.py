"""A bounded fuzz of the two untrusted text inputs every user hands us (issue 12): safetensors
headers and YAML configs. Seeded, a few thousand cases, well under a minute. Each case must
either be accepted (and then read back completely) or be refused with a BTXError of one line
naming the file; anything else (a traceback-worthy exception, a hang, a huge allocation) fails.
A few cases also go through the command line: exit code 2, one `error:` line, nothing
written."""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from megatron_btx import config as train_config
from megatron_btx.checkpoint.hf import PreadSafetensors
from megatron_btx.errors import BTXError

ROOT = Path(__file__).resolve().parents[1]
SEED = 12
DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X1", "", "f32"]


def _odd_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            -1,
            0,
            1,
            2**63,
            10**30,
            1.5,
            float("nan"),
            "7",
            None,
            True,
            [],
            {},
            [1, 2, 3],
            {"a": 1},
            "\x00",
        ]
    )


def _valid_header(rng: random.Random) -> tuple[dict, int]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i in range(rng.randint(0, 4)):
        dtype = rng.choice(["F32", "F16", "BF16"])
        shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        size = (2 if dtype != "F32" else 4) * math.prod(shape)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def _mutate_header(rng: random.Random, header: dict) -> Any:
    names = [k for k in header if k != "__metadata__"]
    action = rng.randrange(9)
    if action == 0 or not names:
        return _odd_value(rng)  # the whole header is not a map
    entry = header[rng.choice(names)]
    if action == 1:
        entry["dtype"] = rng.choice(DTYPES)
    elif action == 2:
        entry["shape"] = [
            _odd_value(rng) if rng.random() < 0.5 else rng.randint(-2, 9) for _ in range(3)
        ]
    elif action == 3:
        entry["data_offsets"] = [rng.randint(-8, 64), rng.randint(-8, 64)]
    elif action == 4:
        entry["data_offsets"] = _odd_value(rng)
    elif action == 5:
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif action == 6:
        header[rng.choice(names)] = _odd_value(rng)
    elif action == 7:
        entry["shape"] = [10**6, 10**6]
    else:
        header["__metadata__"] = _odd_value(rng)
    return header


def _raw_file(rng: random.Random) -> bytes:
    header, size = _valid_header(rng)
    body = bytes(rng.randrange(256) for _ in range(size))
    if rng.random() < 0.8:
        header = _mutate_header(rng, header)
    text = json.dumps(header).encode()
    if rng.random() < 0.1:
        text = text[: rng.randrange(len(text) + 1)]  # truncated JSON
    if rng.random() < 0.05:
        text = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    length = len(text) if rng.random() < 0.9 else rng.choice([0, 7, len(text) + 5, 2**63])
    raw = struct.pack("<Q", length) + text + body
    if rng.random() < 0.05:
        raw = raw[: rng.randrange(len(raw) + 1)]
    return raw


def _one_line(error: BTXError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message, message


def test_fuzz_safetensors_headers(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "model.safetensors"
    accepted = refused = 0
    for _ in range(3000):
        path.write_bytes(_raw_file(rng))
        try:
            reader = PreadSafetensors([path])
        except BTXError as e:
            _one_line(e, path)
            refused += 1
            continue
        try:
            for key in reader.keys():  # every accepted tensor reads back whole
                if reader.dtype(key) in ("F32", "F16", "BF16"):
                    assert list(reader.get(key).shape) == reader.shape(key)
        except BTXError as e:
            _one_line(e, path)
        finally:
            reader.close()
        accepted += 1
    assert accepted > 300 and refused > 1000, (accepted, refused)


BASE = {
    "run_dir": "runs/fuzz",
    "model": {"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": None},
    "data": {"path": "data/small", "seq_length": 64},
    "optimizer": {"adam_beta1": 0.9, "clip_grad": 1.0},
    "train": {"steps": 10, "lr": 1e-3, "resume": "auto"},
    "moe": {"router": None},
}
SNIPPETS = [
    "&a [1, 2]",
    "*a",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGVsbG8=",
    "2001-12-14t21:59:43.10-05:00",
    "[" * 80 + "]" * 80,
    "{a: {b: {c: [1, {d: e}]}}}",
    ".nan",
    "-.inf",
    "1e999",
    "'\\x00'",
    "? [a, b]\n: c",
    "\t",
    "%YAML 1.1\n---",
    "--- !!set {a, b}",
    '"\\ud800"',
]


def _mutate_yaml(rng: random.Random) -> bytes:
    cfg = json.loads(json.dumps(BASE))
    section = rng.choice(list(cfg))
    if isinstance(cfg[section], dict) and cfg[section] and rng.random() < 0.7:
        cfg[section][rng.choice(list(cfg[section]))] = _odd_value(rng)
    else:
        cfg[section] = _odd_value(rng)
    text = yaml.safe_dump(cfg, allow_unicode=True)
    lines = text.splitlines()
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(lines))
        head, _, _ = lines[i].partition(":")
        lines[i] = f"{head}: {rng.choice(SNIPPETS)}" if rng.random() < 0.7 else lines[i][::-1]
    raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:
        raw = raw[: rng.randrange(len(raw) + 1)] + bytes([rng.randrange(128, 256)])
    return raw


def test_fuzz_yaml_configs(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "c.yaml"
    built = refused = 0
    for _ in range(1500):
        path.write_bytes(_mutate_yaml(rng))
        try:
            train_config.load(path)
            built += 1
        except BTXError as e:
            _one_line(e, path)
            refused += 1
        try:
            overrides = ["--model.rope_scaling", path.read_bytes().decode("utf-8", "replace")]
            train_config.load(None, overrides, base=BASE)
        except BTXError as e:
            assert "\n" not in str(e), str(e)
    assert built > 50 and refused > 500, (built, refused)


def test_fuzzed_inputs_on_the_command_line(tmp_path):
    """A few hostile cases through the commands: exit 2, one line, nothing written."""
    rng = random.Random(SEED + 1)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for i in range(3):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_bytes(
            _mutate_yaml(rng)
            + b"\nrun_dir: "
            + str(tmp_path / f"run{i}").encode()
            + b"\nx: *nope\n"
        )
        (hf / "model.safetensors").write_bytes(_raw_file(rng)[:-1])
        for args in (
            ["train", str(cfg)],
            ["import-hf", "--load", str(hf), "--save", str(tmp_path / f"out{i}")],
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "megatron_btx", *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 2, (args, proc.stderr[-2000:])
            assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr
        assert not (tmp_path / f"run{i}").exists() and not (tmp_path / f"out{i}").exists()
