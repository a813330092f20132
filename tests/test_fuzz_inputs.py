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
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
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


# ---- issue 23: checkpoint metadata, manifests, datasets, plans, links ---------------------------
def _refused(error: BTXError, where: Path) -> None:
    message = str(error)
    assert "\n" not in message and str(where) in message, message


def _mutate_chunks(rng: random.Random, md: Any) -> None:
    """One hostile edit of a DCP metadata's chunk layout (the file's index of every tensor)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    tensors = [k for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")]
    key = rng.choice(tensors)
    entry = md.state_dict_metadata[key]
    chunk = entry.chunks[0]
    ndim = len(entry.size)
    action = rng.randrange(8)
    number = lambda: rng.choice([0, 1, 7, 64, 10**6, 2**40, 2**63 - 1, -1])  # noqa: E731
    if action == 0:  # move the chunk
        chunk.offsets = torch.Size(number() if rng.random() < 0.5 else 0 for _ in range(ndim))
    elif action == 1:  # resize it
        chunk.sizes = torch.Size(number() if rng.random() < 0.5 else s for s in chunk.sizes)
    elif action == 2:  # the tensor's global shape
        entry.size = torch.Size(number() if rng.random() < 0.5 else s for s in entry.size)
    elif action == 3:  # a second chunk over (part of) the first, sharing its data
        shift = torch.Size(rng.randrange(0, max(1, s)) for s in chunk.sizes)
        info = md.storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is not None:
            entry.chunks.append(ChunkStorageMetadata(shift, chunk.sizes))
            md.storage_data[MetadataIndex(key, shift, 1)] = info
    elif action == 4:  # the chunk's data elsewhere in its file, or longer than it
        info = md.storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is not None:
            info.offset, info.length = number(), rng.choice([info.length, number()])
    elif action == 5:  # no data for the chunk
        md.storage_data.pop(MetadataIndex(key, chunk.offsets), None)
    elif action == 6:  # a dimension more or less
        chunk.sizes = torch.Size([*chunk.sizes, 1]) if rng.random() < 0.5 else chunk.sizes[:-1]
    else:  # the chunk split in two halves along its first axis (a valid layout)
        rows = chunk.sizes[0] if ndim else 0
        info = md.storage_data.get(MetadataIndex(key, chunk.offsets))
        if rows >= 2 and info is not None:
            half = rows // 2
            entry.chunks[0] = ChunkStorageMetadata(
                chunk.offsets, torch.Size([half, *chunk.sizes[1:]])
            )
            second = torch.Size([chunk.offsets[0] + half, *chunk.offsets[1:]])
            entry.chunks.append(
                ChunkStorageMetadata(second, torch.Size([rows - half, *chunk.sizes[1:]]))
            )
            md.storage_data[MetadataIndex(key, second, 1)] = info


def test_fuzz_metadata_chunk_layouts(mg_llama, tmp_path):
    """Edited chunk layouts of a real checkpoint's `.metadata`: each is refused with one line
    naming the file, or accepted, and then every tensor reads back exactly the original (or
    is refused where it is read, as a chunk that does not hold its data): never a read of
    memory no chunk wrote, never an allocation beyond the checkpoint's size."""
    import copy
    import pickle

    from megatron_btx.checkpoint.dcp_stream import PartialReader
    from megatron_btx.checkpoint.safe_pickle import load_dcp_metadata

    folder = tmp_path / "ckpt"
    shutil.copytree(mg_llama, folder)
    original = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted
    reader = PartialReader(mg_llama)
    reference = {
        k: reader.read_region(k, [0] * len(v.size), list(v.size))
        for k, v in original.state_dict_metadata.items()
        if hasattr(v, "chunks")
    }
    reader.close()
    rng = random.Random(SEED)
    accepted = refused = 0
    for _ in range(200):
        md = copy.deepcopy(original)
        for _ in range(rng.randint(1, 2)):
            _mutate_chunks(rng, md)
        (folder / ".metadata").write_bytes(pickle.dumps(md))
        try:
            load_dcp_metadata(folder / ".metadata")
        except BTXError as e:
            _refused(e, folder)  # the metadata, or the data file it points into
            refused += 1
            continue
        accepted += 1
        reader = PartialReader(folder)
        try:
            for key, entry in reader.md.state_dict_metadata.items():
                if not hasattr(entry, "chunks") or math.prod(entry.size) > 10**7:
                    continue
                try:
                    got = reader.read_region(key, [0] * len(entry.size), list(entry.size))
                except BTXError as e:
                    _refused(e, folder)
                    continue
                assert torch.equal(got, reference[key].reshape(got.shape)), key
        finally:
            reader.close()
    assert accepted > 12 and refused > 100, (accepted, refused)


def test_fuzz_manifest_sizes(mg_llama, tmp_path):
    """Edited model sizes in a real checkpoint's manifest: refused with one line, or accepted
    only when the model they describe fits in the bytes the checkpoint holds; no case
    allocates (the process's peak memory grows by less than 100 MB over all of them)."""
    import resource

    from megatron_btx.checkpoint.bounds import least_params, stored_bytes
    from megatron_btx.checkpoint.dcp_stream import read_metadata
    from megatron_btx.checkpoint.megatron_io import read_args, read_variant

    folder = tmp_path / "ckpt"
    shutil.copytree(mg_llama, folder)
    path = folder / "btx_manifest.json"
    base = json.loads(path.read_text())
    held = stored_bytes(read_metadata(folder))
    sizes = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    sizes += ["num_key_value_heads", "head_dim", "vocab_size", "num_local_experts"]
    rng = random.Random(SEED)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    accepted = refused = 0
    for _ in range(250):
        m = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.85:
                m["model"][rng.choice(sizes)] = rng.choice(
                    [0, 1, 2, 16, 64, 96, 300, 10**6, 10**9, 10**12, 2**63, -4, 1.5, "64", None]
                )
            else:
                m["moe"] = {"layer_freq": rng.choice([[1] * 4, [1, 0] * 2, [1] * 10**5, "x"])}
        path.write_text(json.dumps(m))
        try:
            args = read_args(folder)
        except BTXError as e:
            _refused(e, folder)
            refused += 1
            continue
        accepted += 1
        assert least_params(args, read_variant(folder)) * 4 <= held
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown < 100, f"peak memory grew by {grown:.0f} MB"
    assert accepted > 3 and refused > 180, (accepted, refused)


def test_fuzz_indexed_datasets(data, tmp_path):
    """Edited `.idx` and `.bin` files of a prepared split: refused with one line naming the
    index, or accepted, and then megatron-core's IndexedDataset reads every document of the
    length the index gives, inside the data file."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_btx.data.indexed_check import check_indexed

    prefix = tmp_path / "toy_valid_text_document"
    source = data / "toy_valid_text_document"
    idx0, bin0 = (
        (source.with_suffix(".idx")).read_bytes(),
        (source.with_suffix(".bin")).read_bytes(),
    )
    rng = random.Random(SEED)
    accepted = refused = 0
    for _ in range(400):
        idx, binary = bytearray(idx0), bytearray(bin0)
        for _ in range(rng.randint(1, 3)):
            action = rng.randrange(5)
            if action == 0:  # a byte of the index
                at = rng.randrange(len(idx))
                idx[at] = rng.randrange(256)
            elif action == 1:  # a count (sequences or documents) in the header
                at = rng.choice([18, 26])
                idx[at : at + 8] = rng.choice([0, 1, 5, 17, 18, 10**9, 2**64 - 1]).to_bytes(
                    8, "little"
                )
            elif action == 2:  # truncated or extended
                target = rng.choice(["idx", "bin"])
                buf = idx if target == "idx" else binary
                cut = rng.randrange(len(buf) + 1)
                buf[:] = buf[:cut] if rng.random() < 0.5 else buf + bytes(rng.randrange(1, 9))
            elif action == 3:  # the dtype code
                idx[17] = rng.randrange(12)
            else:  # a sequence length
                n = int.from_bytes(idx0[18:26], "little")
                at = 34 + 4 * rng.randrange(max(1, n))
                idx[at : at + 4] = rng.randrange(-5, 100).to_bytes(4, "little", signed=True)
        prefix.with_suffix(".idx").write_bytes(bytes(idx))
        prefix.with_suffix(".bin").write_bytes(bytes(binary))
        try:
            count = check_indexed(str(prefix))
        except BTXError as e:
            _refused(e, prefix)
            refused += 1
            continue
        accepted += 1
        if count:
            ds = IndexedDataset(str(prefix))
            assert len(ds) == count
            total = sum(len(ds[i]) for i in range(count))
            assert total * ds.index.dtype_size == len(binary)
    assert accepted > 10 and refused > 250, (accepted, refused)


def test_fuzz_plan_json(tmp_path):
    """Edited plan.json documents: refused with one line naming the file, or read back as
    stages whose dependencies come before them, with the types the executors use."""
    from test_slurm_render import tiny_plan

    from megatron_btx.pipeline.stages import Plan, read_plan_file, save_plan

    run = tmp_path / "run"
    run.mkdir()
    save_plan(run, Plan(tiny_plan(run), str(tmp_path / "seed")))
    base = json.loads((run / "plan.json").read_text())
    keys = ["name", "kind", "argv", "deps", "nproc", "outputs", "workdir", "checkpoint", "steps"]
    rng = random.Random(SEED)
    accepted = refused = 0
    for _ in range(600):
        doc = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            action = rng.randrange(6)
            stages = doc.get("stages") if isinstance(doc.get("stages"), list) else []
            if action == 0 and stages:
                entry = rng.choice(stages)
                if isinstance(entry, dict):
                    entry[rng.choice(keys)] = _odd_value(rng)
            elif action == 1 and len(stages) > 1:
                rng.shuffle(stages)  # dependencies after their stages
            elif action == 2 and stages:
                stages.append(json.loads(json.dumps(rng.choice(stages))))  # a name twice
            elif action == 3:
                doc[rng.choice(["run_dir", "seed_checkpoint", "format_version"])] = _odd_value(rng)
            elif action == 4 and stages and isinstance(stages[-1], dict):
                stages[-1]["deps"] = [rng.choice(["seed", "merge", "nope", "../x", "a\nb"])]
            else:
                doc["stages"] = _odd_value(rng) if rng.random() < 0.3 else stages
        (run / "plan.json").write_text(json.dumps(doc))
        try:
            plan = read_plan_file(run)
        except BTXError as e:
            _refused(e, run)
            refused += 1
            continue
        accepted += 1
        seen: set[str] = set()
        for stage in plan.stages:
            assert all(d in seen for d in stage.deps) and stage.name not in seen
            assert all(isinstance(a, str) for a in stage.argv) and stage.nproc >= 1
            seen.add(stage.name)
    assert accepted > 60 and refused > 200, (accepted, refused)


def test_fuzz_symlinks(hf_llama, tmp_path):
    """HF folders whose files are links (inside, outside, chains, dangling, loops, devices,
    FIFOs): read (config, weights, tokenizer files) only when every file resolves inside the
    folder as a regular file; else one line naming it. Nothing outside is ever read."""
    import os

    from megatron_btx.checkpoint.convert import _read_config
    from megatron_btx.checkpoint.hf import HFReader, tokenizer_files

    outside = tmp_path / "outside"
    outside.mkdir()
    for path in hf_llama.iterdir():
        shutil.copy(path, outside / path.name)
    (outside / "tokenizer.json").write_text("{}")
    names = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"]
    rng = random.Random(SEED)
    accepted = refused = 0
    for case in range(150):
        folder = tmp_path / f"hf{case}"
        shutil.copytree(hf_llama, folder)
        (folder / "tokenizer.json").write_text("{}")
        (folder / "store").mkdir()
        escapes = broken = False  # a link out of the folder; a needed file that is no file
        for name in rng.sample(names, rng.randint(1, 3)):
            path = folder / name
            kind = rng.randrange(7)
            if kind == 0:  # a link to a copy inside the folder (relative or absolute)
                shutil.move(path, folder / "store" / name)
                target = Path("store") / name if rng.random() < 0.5 else folder / "store" / name
                path.symlink_to(target)
            elif kind == 1:  # a link to the same file outside
                path.unlink()
                path.symlink_to(outside / name)
                escapes = True
            elif kind == 2:  # a chain: inside link -> outside
                path.unlink()
                (folder / "store" / f"hop_{name}").symlink_to(outside / name)
                path.symlink_to(folder / "store" / f"hop_{name}")
                escapes = True
            elif kind == 3:  # dangling
                path.unlink()
                path.symlink_to(folder / "store" / "nothing")
                broken |= name in ("config.json", "model.safetensors")
            elif kind == 4:  # a loop
                path.unlink()
                path.symlink_to(path)
                broken |= name in ("config.json", "model.safetensors")
            elif kind == 5:  # a device
                path.unlink()
                path.symlink_to("/dev/zero")
                escapes = True
            else:  # a FIFO
                path.unlink()
                os.mkfifo(path)  # an optional tokenizer file that is no file is not read
                broken |= name in ("config.json", "model.safetensors")
        try:
            _read_config(folder / "config.json")
            HFReader(folder).close()
            tokenizer_files(folder)
        except BTXError as e:
            assert "\n" not in str(e) and str(folder) in str(e), str(e)
            refused += 1
            continue
        assert not escapes, f"case {case}: a file outside the folder was read"
        assert not broken, f"case {case}: a needed file that is not a regular file was read"
        accepted += 1
    assert accepted > 5 and refused > 60, (accepted, refused)
