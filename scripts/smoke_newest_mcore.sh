#!/usr/bin/env bash
# The smoke subset against the newest megatron-core under Python 3.12, run by .ci/run after the
# default suite: conversion, merge, training from a checkpoint, resume, evaluation, and the
# places where megatron-core's API changed after 0.16 (layer specs holding builders, the
# permute contract, expert-gradient routing). scripts/test_newest_mcore.sh builds .venv312
# (about 4-5 minutes and 6 GB the first time) and runs pytest there.
#
# Nothing here is skipped quietly: a missing Python 3.12 or package index stops the step with
# exit 2 and one `error:` line (test_newest_mcore.sh), a failing test fails it, and so does a
# test that skips (a skipped smoke test checks nothing).
#
#   bash scripts/smoke_newest_mcore.sh              # the subset (about 6 minutes on 2 cores)
#   bash scripts/smoke_newest_mcore.sh --durations=0  # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

SMOKE=(
  # conversion: HF Llama -> megatron -> HF byte for byte; a megatron MoE -> HF Mixtral
  tests/test_convert.py::test_round_trip_is_byte_identical
  tests/test_convert.py::test_random_megatron_moe_exports_to_mixtral
  # merge: dense checkpoints -> MoE, exported to HF and loaded back in megatron
  tests/test_merge.py::test_hf_export_matches_megatron_and_manifest
  tests/test_merge.py::test_variants_load_in_megatron
  # training from a checkpoint; resume (kill -9, SIGTERM; distributed optimizer at another TP)
  tests/test_train_runs.py::test_init_from_converted_hf_checkpoint
  tests/test_train_runs.py::test_kill9_then_resume_matches_and_sigterm_saves
  tests/test_train_parallel.py::test_distributed_optimizer_dp2_then_resume_at_tp2
  tests/test_train_parallel.py::test_moe_ep2_matches_ep1
  tests/test_integrity.py::test_training_saves_record_every_file
  # evaluation; and every stage in one `btx run`, killed and resumed
  tests/test_security_errors.py::test_evaluate_the_btx_model_alone
  tests/test_pipeline_e2e.py::test_btx_run_end_to_end_killed_and_resumed
  # megatron-core's MoE internals that changed after 0.16
  tests/test_grouped_experts.py
  tests/test_speedups.py
  tests/test_mcore_layouts.py::test_whole_experts_beside_tp2_reduce_their_gradients
)

REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
cd "$ROOT"
# --long: the smoke ids include tests of the long group, which the default suite deselects
bash "$ROOT/scripts/test_newest_mcore.sh" -rs --long --junitxml="$REPORT" "${SMOKE[@]}" "$@"
python3 - "$REPORT" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
ran = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
if ran == 0 or skipped:
    print(f"error: the newest-megatron-core smoke subset ran {ran} tests and skipped {skipped}; "
          "every smoke test must run (see the skip reasons above)", file=sys.stderr)
    sys.exit(2)
print(f"[newest-mcore] smoke subset: {ran} tests, none skipped")
PY
