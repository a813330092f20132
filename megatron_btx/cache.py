"""Where megatron_btx keeps what it downloads: the user cache directory, never the source tree
(which, for a wheel install, is site-packages).

- ``$BTX_CACHE`` when set, else ``$XDG_CACHE_HOME/megatron_btx`` (an absolute
  ``XDG_CACHE_HOME`` only, as the XDG specification says), else ``~/.cache/megatron_btx``;
- the built-in corpora (Debian packages, wheels, prepared text) directly under it, or under
  ``$BTX_DATA_CACHE`` when that is set (its older name, kept);
- models (a seed's wheel and the GGUF file taken out of it) under ``<cache>/models``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: environment variable: the whole cache
CACHE_ENV = "BTX_CACHE"
#: environment variable: the built-in corpora's cache only (takes precedence for them)
DATA_CACHE_ENV = "BTX_DATA_CACHE"


def cache_root() -> Path:
    """``$BTX_CACHE``, else ``$XDG_CACHE_HOME/megatron_btx``, else ``~/.cache/megatron_btx``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "megatron_btx"
    return Path.home() / ".cache" / "megatron_btx"


def data_cache_dir() -> Path:
    """The built-in corpora's download cache: ``$BTX_DATA_CACHE``, else :func:`cache_root`."""
    env = os.environ.get(DATA_CACHE_ENV)
    return Path(env).expanduser() if env else cache_root()


def model_cache_dir() -> Path:
    """Downloaded models: ``<cache>/models``."""
    return cache_root() / "models"
