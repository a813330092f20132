"""A router type, a router initialisation and a baseline are each one registry entry.

The plugin below is written by this test alone, into a folder of its own, and named to every
`btx` process with BTX_PLUGINS (megatron_btx/plugins.py): nothing in the package knows it. A
whole `btx run` (planning, the merge, training, evaluation) then uses all three. If a new entry
needed an edit anywhere else in the package, this test could not pass.

- router type ``toy_first_two``: every token goes to experts 0 and 1, weighted by their softmax
  renormalised over the two. Expected: the finetune's compute counts 2 experts per token (a hand
  count), and the evaluated routing sends no token to experts 2 and 3.
- router init ``toy_eye``: router row i is 0.125 times the i-th unit vector. Expected: the
  merged checkpoint's routers are exactly that, in every layer.
- baseline ``toy_one_domain``: the seed continued on the first expert domain only, at BTX's
  compute. Expected: its stage trains on that domain alone, its steps are FLOPs-matched (a hand
  count), and the evaluation compares BTX with it (a paired interval) like any rival.
"""

from __future__ import annotations

import json
import math
import os
import textwrap

import pytest
import torch
import yaml
from cli_contract import ROOT, btx, one_error
from test_pipeline_e2e import TINY_MODEL, make_text_domains

pytestmark = [pytest.mark.slow]

PLUGIN = """
import torch

from megatron_btx.errors import BTXError
from megatron_btx.merge import router_inits
from megatron_btx.models import router_types
from megatron_btx.pipeline import baselines
from megatron_btx.pipeline.models import ModelSpec


@router_types.register
class FirstTwo(router_types.RouterType):
    name = "toy_first_two"

    def top_k(self, model_top_k, num_experts):
        return 2

    def route(self, router, logits, scores):
        routing_map = torch.zeros_like(logits, dtype=torch.bool)
        routing_map[:, :2] = True
        probs = scores * routing_map
        probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs.to(logits.dtype), routing_map, probs

    def hf_routing(self, model_top_k, num_experts):
        raise BTXError("toy_first_two has no HF form")


@router_inits.register
class Eye(router_inits.RouterInit):
    name = "toy_eye"

    def expected(self, settings, layer, shape):
        return torch.eye(*shape) * 0.125


@baselines.register
class OneDomain(baselines.Baseline):
    name = "toy_one_domain"
    default = False

    def plan(self, planner, train):
        added = planner.train_baseline(
            "toy_one_domain",
            "toy_one_domain",
            planner.stage_like("experts", train),
            init_from=planner.seed_checkpoint,
            deps=planner.seed_deps,
            moe=False,
            domains=[planner.names[0]],
        )
        planner.add_model(
            ModelSpec(self.name, "dense", "rival", checkpoint=added.checkpoint,
                      stages=[added.name], stage=added.name, order=25)
        )
"""


def test_a_toy_router_init_and_baseline_from_a_plugin_run_end_to_end(tmp_path):
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "btx_toy_plugin.py").write_text(textwrap.dedent(PLUGIN))
    doms = make_text_domains(tmp_path / "text", n_files=20, words=200)
    small = {"micro_batch_size": 4, "global_batch_size": 4, "warmup_steps": 1, "lr": 3e-3}
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"vocab_size": 300, "split": "test=0.15,valid=0.1", "seq_length": 64},
        "domains": {n: {"source": str(p)} for n, p in doms.items()},
        "model": dict(TINY_MODEL),
        "seed": {"pretrain": {"steps": 4, **small}},
        "experts": {"steps": 2, **small},
        "merge": {"router_init": "toy_eye"},
        "finetune": {"steps": 3, "router": {"type": "toy_first_two"}, **small},
        "baselines": {"dense": False, "sparse_upcycling": False, "toy_one_domain": True},
        "evaluation": {"tokens_per_domain": 128, "micro_batch_size": 4, "btm_top_k": [3]},
        "train": {"log_interval": 1, "eval_iters": 1},
    }
    path = tmp_path / "btx.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # without the plugin the names are unknown: a one-line error, nothing planned
    one_error(btx("run", str(path), "--dry-run", cwd=tmp_path), "toy")
    assert not (tmp_path / "run" / "plan.json").exists()
    env = {
        "PYTHONPATH": f"{ROOT}{os.pathsep}{plugin_dir}",
        "BTX_PLUGINS": "btx_toy_plugin",
    }
    result = btx("run", str(path), "--parallel", "2", cwd=tmp_path, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    plan = json.loads((run / "plan.json").read_text())
    stages = {s["name"]: s for s in plan["stages"]}

    # the router type: 2 experts per token in the compute (hidden 32, FFN 64, 2 layers,
    # vocab 300; 3 experts + the seed = 4 experts, router 32 x 4 per layer)
    attention = 4 * 32 * 32
    assert stages["finetune"]["active_params"] == 2 * (attention + 2 * 3 * 32 * 64 + 32 * 4) + (
        300 * 32
    )
    routing = json.loads((run / "eval" / "routing.json").read_text())["btx"]
    for layers in routing.values():
        for stats in layers.values():
            assert stats["load"][2] == stats["load"][3] == 0.0
            assert stats["load"][0] > 0 and stats["load"][1] > 0

    # the router init: 0.125 x the unit vectors, in every layer of the merged checkpoint
    from megatron_btx.checkpoint.dcp_stream import PartialReader

    reader = PartialReader(stages["merge"]["checkpoint"])
    try:
        key = "decoder.layers.mlp.router.weight"
        size = list(reader.md.state_dict_metadata[key].size)
        routers = reader.read_region(key, [0] * len(size), size).float()
    finally:
        reader.close()
    for layer in routers:
        torch.testing.assert_close(layer, torch.eye(4, 32) * 0.125, rtol=0, atol=0)

    # the baseline: one domain, FLOPs-matched to BTX (experts + finetune), compared with BTX
    toy = stages["toy_one_domain"]
    config = yaml.safe_load((run / "configs" / "toy_one_domain.yaml").read_text())
    first = next(iter(doms))
    assert config["data"]["domains"] == [first]
    btx_flops = (
        sum(stages[n]["flops"] for n in stages if n.startswith("expert_"))
        + stages["finetune"]["flops"]
    )
    per_step = 6.0 * toy["active_params"] * 4 * 64
    assert toy["steps"] == max(1, round(btx_flops / per_step))
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["models"]["toy_one_domain"]["role"] == "rival"
    compared = results["intervals"]["comparisons"]
    assert {"toy_one_domain", "btm_top3", "seed"} <= set(compared)
    diff = compared["toy_one_domain"]["mean_of_groups"]["loss"]
    # the percentile bounds bracket the estimate (to rounding: they are computed apart)
    assert diff["low"] - 1e-9 <= diff["estimate"] <= diff["high"] + 1e-9
    assert math.isfinite(diff["estimate"])
    assert "toy_one_domain" in (run / "eval" / "results.md").read_text()
