"""What a domain name may be: it names files (``<domain>_train_text_document``), stages
(``expert_<domain>``) and Slurm jobs, so one ASCII word, the same rule in `btx prepare-data`,
`btx run` and `btx launch` (a name like ``é`` used to pass the first two and fail the third)."""

from __future__ import annotations

import re

DOMAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def valid_domain_name(name: object) -> bool:
    return isinstance(name, str) and DOMAIN_NAME.fullmatch(name) is not None
