"""The models of a BTX run: what the planner writes into plan.json for the evaluator.

Every model a run evaluates is one :class:`ModelSpec`: its name (a row of the results), how it is
scored (``kind``: a dense or MoE checkpoint, or a BTM ensemble of the experts), its role in the
comparisons, the stage that leaves its checkpoint and the stages whose compute it cost. The
evaluator reads these and holds no model names: a new baseline is a new spec, written by its
planner entry (:mod:`megatron_btx.pipeline.baselines`), and is scored, tabled and compared with
BTX like the others.

Roles:

- ``btx``: the model under test (BTX after finetuning);
- ``rival``: compared with BTX, paired, in every group of domains (the seed, the dense
  baseline, BTM, sparse upcycling, ...);
- ``reference``: shown, not compared with BTX: the experts (``part: expert``, with their
  ``domain``) and the merge before finetuning (``part: merged``).

The seed has role ``rival`` and ``part: seed``: the experts' claims compare against it. The
``extend`` experiment's models are rivals of ``part: extension``: compared with BTX (the MoE they
extend), outside the claim that BTX is best at equal compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from megatron_btx.errors import BTXError

KINDS = ("dense", "moe", "btm")
ROLES = ("btx", "rival", "reference")
PARTS = ("seed", "expert", "merged", "extension")

#: the names of the models every run has (baselines name their own)
SEED = "seed"
BTX = "btx"
MERGED = "btx_merge_only"
EXPERT_PREFIX = "expert_"


def expert_name(domain: str) -> str:
    """The model (and stage) name of the expert trained on `domain`."""
    return f"{EXPERT_PREFIX}{domain}"


@dataclass
class ModelSpec:
    name: str
    kind: str  # dense | moe | btm
    role: str  # btx | rival | reference
    #: the checkpoint it is scored from (None: a BTM ensemble; a seed not yet trained)
    checkpoint: str | None = None
    #: the stages whose training compute it cost, after the seed (the seed's is shared)
    stages: list[str] = field(default_factory=list)
    #: the stage that leaves the checkpoint (None: given, e.g. an imported seed)
    stage: str | None = None
    #: seed | expert | merged, for the claims that need them; None for the others
    part: str | None = None
    #: the expert's domain
    domain: str | None = None
    #: an MoE's router config (how the evaluator routes it)
    router: dict[str, Any] | None = None
    #: a BTM ensemble's experts per document
    k: int | None = None
    #: the row's place in tables (then the plan's order)
    order: int = 0
    #: how tables name it in prose ("sparse upcycling")
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BTXError(f"model {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.role not in ROLES:
            raise BTXError(f"model {self.name}: role {self.role!r} is not one of {ROLES}")
        if self.part is not None and self.part not in PARTS:
            raise BTXError(f"model {self.name}: part {self.part!r} is not one of {PARTS}")
        if self.kind == "btm" and not (isinstance(self.k, int) and self.k >= 1):
            raise BTXError(f"model {self.name}: a BTM ensemble needs k >= 1")
        self.label = self.label or self.name.replace("_", " ")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in known})


def by_part(models: dict[str, ModelSpec] | list[ModelSpec], part: str) -> list[ModelSpec]:
    values = models.values() if isinstance(models, dict) else models
    return [m for m in values if m.part == part]


def experts_by_domain(models) -> dict[str, ModelSpec]:
    """The experts, by their domain."""
    return {m.domain: m for m in by_part(models, "expert")}


def the(models, part: str) -> ModelSpec | None:
    """The one model of `part` (seed, merged), or None."""
    found = by_part(models, part)
    return found[0] if found else None


def btx_model(models) -> ModelSpec | None:
    values = models.values() if isinstance(models, dict) else models
    return next((m for m in values if m.role == "btx"), None)


def rivals(models) -> list[ModelSpec]:
    values = models.values() if isinstance(models, dict) else models
    return [m for m in values if m.role == "rival"]
