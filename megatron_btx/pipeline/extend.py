"""The ``extend`` experiment: domains added to a finished BTX MoE (BTX's asynchrony one step
further), planned after the run's own stages.

- ``expert_<domain>``: an expert per new domain, branched from the seed like the others (the
  experts' stage settings);
- ``merge_extend``: ``btx merge --into`` the finetuned MoE: its experts and router rows kept,
  the new experts appended (``extend.shared``, ``extend.router_init``; the run's merge settings
  that apply to new experts: router std/seed, centroid sample, Drop-Upcycling, dtype, checks);
- ``finetune_extend``: a brief finetune on the blend with the new domains;
- with ``extend.scratch``: ``merge_scratch`` and ``finetune_scratch``, BTX trained from scratch
  with every expert (the run's merge and finetune settings, the blend with the new domains).

Models (role ``rival``, part ``extension``: compared with BTX, the MoE they extend, but not part
of the claim that BTX is best at equal compute): ``btx_extended`` and ``btx_scratch``, each
with the compute of every stage it took; the new experts are references. The evaluation's
``new`` group holds the added domains: BTX minus ``btx_extended`` there is the gain, on the
``experts`` group (the old domains) the forgetting.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_btx.errors import BTXError
from megatron_btx.merge.settings import MergeSettings
from megatron_btx.pipeline.models import BTX, ModelSpec, expert_name
from megatron_btx.pipeline.stages import Stage

#: the run's merge settings that also apply to experts added with --into
INTO_KEYS = (
    "router_std",
    "router_seed",
    "centroid_tokens",
    "centroid_seq_len",
    "drop_ratio",
    "drop_seed",
    "dtype",
    "verify",
    "verify_hashes",
    "hash_output",
)
EXTENDED = "btx_extended"
SCRATCH = "btx_scratch"


def plan_extend(planner: Any) -> None:
    """Add the experiment's stages and models to `planner` (after the run's finetune)."""
    cfg = planner.cfg
    new = cfg.new_domain_names
    blend = {n: w for n, w in cfg.extended_weights().items() if w > 0}
    added = [_new_expert(planner, domain) for domain in new]
    merged = _merge_into(planner, added)
    finetune = _brief_finetune(planner, merged, blend)
    btx = next(m for m in planner.models if m.name == BTX)
    planner.add_model(
        ModelSpec(
            EXTENDED,
            "moe",
            "rival",
            checkpoint=finetune.checkpoint,
            stages=[*btx.stages, *(s.name for s in added), merged.name, finetune.name],
            stage=finetune.name,
            part="extension",
            router=planner.router,
            order=110,
            label=f"BTX + {', '.join(new)} added",
        )
    )
    if cfg.extend.scratch:
        _scratch(planner, added, blend)


def _data(planner: Any, domain: str) -> str:
    return f"{planner.data_path}/{domain}_train_text_document"


def _new_expert(planner: Any, domain: str) -> Stage:
    name = expert_name(domain)
    added = planner.train(
        name,
        f"{planner.run}/experts/{domain}",
        planner.stage_like("experts", None),
        [domain],
        planner.seed_checkpoint,
        planner.seed_deps,
        planner.dense_active,
        "extend",
    )
    planner.add_model(
        ModelSpec(
            name,
            "dense",
            "reference",
            checkpoint=added.checkpoint,
            stages=[name],
            stage=name,
            domain=domain,
            order=12,
            label=f"the {domain} expert (added)",
        )
    )
    return added


def _merge_into(planner: Any, added: list[Stage]) -> Stage:
    """``btx merge --into`` the finetuned MoE; its stage records the extended MoE's shape."""
    from megatron_btx.merge import router_inits
    from megatron_btx.models.llama import check_parallel

    cfg, ext = planner.cfg, planner.cfg.extend
    finetuned = next(s for s in planner.stages if s.name == "finetune")
    init = router_inits.get(ext.router_init or cfg.merge.value("router_init"))
    save = f"{planner.run}/extend/merged"
    choices = {k: v for k, v in cfg.merge.settings.items() if k in INTO_KEYS}
    choices["router_init"] = init.name
    choices.update(init.run_settings([_data(planner, d) for d in cfg.new_domain_names]))
    settings = MergeSettings.from_choices(
        choices,
        experts=[s.checkpoint for s in added],
        save=save,
        into=finetuned.checkpoint,
        shared=ext.shared,
        overwrite=True,
        progress=False,
        **planner.moe_layout,
    )
    settings.validate()
    experts = planner.moe_args.num_local_experts + len(added)
    args = dataclasses.replace(planner.moe_args, num_local_experts=experts)
    try:
        check_parallel(args, **planner.moe_layout)
    except BTXError as e:
        raise BTXError(f"{cfg.source or 'config'}: extend: the extended MoE: {e}") from e
    stage = Stage(
        "merge_extend",
        "merge",
        ["merge", *settings.to_argv()],
        [finetuned.name, *(s.name for s in added)],
        1,
        [f"{save}/metadata.json"],
        workdir=save,
        group="extend",
        checkpoint=save,
        router=planner.router,
    )
    planner.stages.append(stage)
    planner.shapes[stage.name] = (args, planner.variant)
    return stage


def _brief_finetune(planner: Any, merged: Stage, blend: dict[str, float]) -> Stage:
    cfg = planner.cfg
    given = cfg.extend.finetune
    stage = planner.stage_like("finetune", given)
    if given is None or given.steps is None:
        stage.steps = max(1, int(cfg.finetune.steps or 0) // 4)
    return planner.train(
        "finetune_extend",
        f"{planner.run}/extend/finetune",
        stage,
        blend,
        merged.checkpoint,
        [merged.name],
        planner.active_of(merged),
        "extend",
        planner.finetune_moe_section(),
    )


def _scratch(planner: Any, added: list[Stage], blend: dict[str, float]) -> None:
    """BTX from scratch with every expert: the run's merge of all of them, its whole finetune."""
    from megatron_btx.merge import router_inits

    cfg = planner.cfg
    experts = [*planner.expert_stages, *added]
    domains = [*planner.names, *cfg.new_domain_names]
    data = [_data(planner, d) for d in domains]
    if cfg.merge.seed_as_expert:
        data.append(",".join(f"{_data(planner, n)}@{w:g}" for n, w in blend.items()))
    init = router_inits.get(cfg.merge.value("router_init"))
    merged = planner.merge_stage(
        "merge_scratch",
        [s.checkpoint for s in experts],
        "extend/merged_scratch",
        [s.name for s in experts] + planner.seed_deps,
        group="extend",
        **init.run_settings(data),
    )
    finetune = planner.train(
        "finetune_scratch",
        f"{planner.run}/extend/finetune_scratch",
        planner.stage_like("finetune", None),
        blend,
        merged.checkpoint,
        [merged.name],
        planner.active_of(merged),
        "extend",
        planner.finetune_moe_section(),
    )
    count = len(experts) + (1 if cfg.merge.seed_as_expert else 0)
    planner.add_model(
        ModelSpec(
            SCRATCH,
            "moe",
            "rival",
            checkpoint=finetune.checkpoint,
            stages=[*(s.name for s in experts), merged.name, finetune.name],
            stage=finetune.name,
            part="extension",
            router=planner.router,
            order=111,
            label=f"BTX from scratch with {count} experts",
        )
    )
