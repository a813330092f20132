"""Where a merge's time goes: runs `btx merge` in this process with wall-clock timers around its
main phases and prints them (inclusive times; phases nest), as a table and as JSON.

    python benchmarks/merge_phases.py [--skip-source-hash] [--json FILE] -- MERGE ARGS...
    python benchmarks/merge_phases.py -- --experts A B C --seed S --save OUT --overwrite

--skip-source-hash replaces the sources' sha256 (the manifest's provenance) by empty entries, to
show what the hashing on the second core costs; the checkpoint written is otherwise the same.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
TIMES: collections.Counter[str] = collections.Counter()


def _timed(owner, attr: str, label: str) -> None:
    orig = getattr(owner, attr)

    @functools.wraps(orig)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            TIMES[label] += time.perf_counter() - t

    setattr(owner, attr, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-source-hash", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("merge_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.merge_args[1:] if a.merge_args[:1] == ["--"] else a.merge_args

    t = time.perf_counter()
    import megatron_btx.runtime as runtime
    from megatron_btx.checkpoint import dcp_stream, hf, sources
    from megatron_btx.merge import cli, run

    TIMES["import torch + megatron_btx"] = time.perf_counter() - t
    _timed(runtime, "init", "runtime init (imports megatron-core)")
    _timed(dcp_stream.StreamingDCPWriter, "write", "write checkpoint parts")
    _timed(dcp_stream.StreamingDCPWriter, "finish", "finish (fsync, metadata)")
    _timed(sources.Source, "layer", "read a source layer")
    _timed(hf.PreadSafetensors, "get", "  of which pread")
    _timed(run, "merge_layer", "read + average a layer")
    _timed(run.LayerStream, "run", "streaming loop (all of the above)")
    if a.skip_source_hash:
        run._sha256_files = lambda files: {}
    rc = 0
    try:
        rc = cli.main(args) or 0
    finally:
        TIMES["total in process"] = time.perf_counter() - T0
        rows = sorted(TIMES.items(), key=lambda kv: -kv[1])
        print(f"\n{'phase':45s} {'seconds':>8s}")
        for k, v in rows:
            print(f"{k:45s} {v:8.2f}")
        if a.json:
            Path(a.json).write_text(json.dumps({k: round(v, 3) for k, v in rows}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
