"""Extending megatron_btx without editing it.

A plugin is a Python module that, when imported, registers entries in the package's registries:
router types (:mod:`megatron_btx.models.router_types`), router initialisations
(:mod:`megatron_btx.merge.router_inits`), baselines (:mod:`megatron_btx.pipeline.baselines`)
and HF model families (:mod:`megatron_btx.checkpoint.families`). Plugins are named by

- the environment variable ``BTX_PLUGINS``: comma-separated module names, importable (installed,
  or on ``PYTHONPATH``);
- the entry-point group ``megatron_btx.plugins`` of installed packages (each entry point names a
  module).

They are imported once per process, on the first registry lookup. Every stage of a run is a
process of its own (local subprocesses, Slurm jobs); each inherits the environment, so a plugin
named in ``BTX_PLUGINS`` is known to every stage.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata

from megatron_btx.errors import BTXError

ENV = "BTX_PLUGINS"
GROUP = "megatron_btx.plugins"

_loaded = False


def names() -> list[str]:
    """The plugin modules this process would import: ``BTX_PLUGINS``, then entry points."""
    found = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for entry in metadata.entry_points(group=GROUP):
        if entry.value not in found:
            found.append(entry.value)
    return found


def load() -> None:
    """Import every plugin module once; a module that fails to import is a BTXError naming it."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before importing: a plugin's own registry lookups must not recurse
    for name in names():
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure is the plugin's: name it
            _loaded = False
            raise BTXError(f"{ENV}/{GROUP}: plugin {name!r} failed to import ({e})") from e
