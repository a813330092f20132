"""Reading configs: YAML (no aliases, bounded nesting), ``--section.key VALUE`` overrides, and
dataclasses built from plain dicts with type checks that name the key (shared by the training
config, :mod:`megatron_btx.config`, and the BTX run config, :mod:`megatron_btx.pipeline.config`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_btx.errors import BTXError


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key
# ---------------------------------------------------------------------------------------------
def build_dataclass(
    cls: type, data: Any, prefix: str = "", source: str = "config", exclude: tuple[str, ...] = ()
) -> Any:
    """A config dataclass from a plain dict (YAML), recursing into dataclass and optional
    dataclass fields. Unknown keys (with a close match suggested) and values of the wrong type
    are a BTXError naming the full dotted key and the file. `exclude` names fields that are set
    by code, not by the user (they count as unknown keys). A dataclass with a
    ``from_config(data, prefix, source)`` classmethod builds itself (sections whose keys come
    from a registry)."""
    if hasattr(cls, "from_config"):  # a section with keys of its own (e.g. a registry's)
        return cls.from_config(data, prefix, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BTXError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = close_match(str(key), names)
            hint = f" (did you mean {prefix}{close}?)" if close else ""
            raise BTXError(f"{source}: unknown key {full!r}{hint}")
        typ = hints[key]
        optional_dataclass = [a for a in typing.get_args(typ) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = build_dataclass(typ, value, f"{full}.", source)
        elif optional_dataclass:
            kwargs[key] = (
                None
                if value is None
                else build_dataclass(optional_dataclass[0], value, f"{full}.", source)
            )
        else:
            kwargs[key] = coerce(value, typ, full, source)
    return cls(**kwargs)


def close_match(key: str, names: set[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return m[0] if m else None


def coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `typ`, converting where YAML is ambiguous
    (``3e-4`` is a string to YAML 1.1, an int where a float is wanted)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key, source)
            except BTXError as e:
                errors.append(str(e))
                # a mapping or list given where one is allowed: its own error says what is
                # wrong inside it (a key, a non-finite number), better than "wrong type"
                if typing.get_origin(a) in (dict, list) and isinstance(
                    value, dict if typing.get_origin(a) is dict else (list, tuple)
                ):
                    raise
        raise BTXError(
            errors[0]
            if len(errors) == 1
            else f"{source}: {key}={value!r} has the wrong type (expected {_tname(typ)})"
        )
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            raise _quoted(value, key, source, int)
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            raise _quoted(value, key, source, float)
        if number is not None:
            if not math.isfinite(number):
                raise BTXError(f"{source}: {key}={value!r} must be a finite number")
            return number
    elif typ is str:
        if isinstance(value, str):
            if "\0" in value:
                raise BTXError(f"{source}: {key}={value!r} contains a NUL byte; remove it")
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif origin is list:
        (item,) = typing.get_args(typ) or (Any,)
        if isinstance(value, (list, tuple)):
            return [coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        kt, vt = typing.get_args(typ) or (Any, Any)
        if isinstance(value, dict):
            return {
                coerce(k, kt, key, source): coerce(v, vt, f"{key}.{k}", source)
                for k, v in value.items()
            }
    raise BTXError(f"{source}: {key}={value!r} has the wrong type (expected {_tname(typ)})")


def _quoted(value: str, key: str, source: str, typ: type) -> BTXError:
    """Text where a number is wanted (``steps: '2'`` too): refused, not guessed at."""
    return BTXError(
        f"{source}: {key}={value!r} has the wrong type (expected {typ.__name__}; a quoted "
        f"value is text: write a number without quotes)"
    )


def _tname(typ: Any) -> str:
    if isinstance(typ, type):
        return typ.__name__
    return str(typ).replace("typing.", "")


# ---------------------------------------------------------------------------------------------
# YAML and overrides
# ---------------------------------------------------------------------------------------------
#: how deep a YAML config may nest (sections, mappings in them, lists): far more than any real
#: config, far less than Python's recursion limit
MAX_YAML_DEPTH = 50


class YAMLRefused(yaml.composer.ComposerError):
    """Valid YAML that a config may not use: an alias, or nesting past MAX_YAML_DEPTH."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (`*name`) and with a nesting limit: an alias lets a
    1 KB file ("billion laughs") expand to gigabytes when the config is copied or dumped, and a
    deep nest overflows the recursion limit. Neither has a use in a config. A key given twice in
    one mapping is refused (PyYAML keeps the last silently), and a number in exponent form
    without a dot (``3e-4``, ``1e6``: a string to YAML 1.1) is a number, so a quoted value is
    always text and is refused where a number is wanted."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise YAMLRefused(
                        None,
                        None,
                        f"key {key!r} given twice (the first at {seen[key]})",
                        key_node.start_mark,
                    )
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            seen[key] = f"line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YAMLRefused(
                None, None, f"alias *{event.anchor}: YAML aliases are not allowed", event.start_mark
            )
        self._btx_depth = getattr(self, "_btx_depth", 0) + 1
        try:
            if self._btx_depth > MAX_YAML_DEPTH:
                raise YAMLRefused(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._btx_depth -= 1


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, where: str, invalid_as_text: bool = False) -> Any:
    """A YAML document without aliases or deep nesting (:class:`_ConfigLoader`); BTXError
    naming `where` when it uses either, or is not valid YAML (unless `invalid_as_text`: then
    the text itself, as an override value that is not YAML is the string given)."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass
    except YAMLRefused as e:
        raise BTXError(f"{where}: {e.problem} ({' '.join(str(e.problem_mark).split())})") from e
    except yaml.YAMLError as e:
        if invalid_as_text:
            return text
        raise BTXError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from e


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's top-level mapping (see :func:`parse_yaml`)."""
    path = Path(path)
    if not path.is_file():
        raise BTXError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BTXError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from e
    except OSError as e:
        raise BTXError(f"{path}: cannot be read ({e.strerror})") from e
    raw = parse_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BTXError(f"{path}: the top level must be a mapping of sections")
    return raw


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``["--train.lr", "3e-4", "--parallel.tp=2"]`` -> ``[("train.lr", "3e-4"), ...]``
    (values parsed as YAML; typing happens when the config is built)."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise BTXError(f"override {arg!r} must look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise BTXError(f"override --{key} has no value")
            raw = argv[i + 1]
            i += 2
        value = parse_yaml(raw, f"override --{key}", invalid_as_text=True) if raw != "" else ""
        out.append((key, value))
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in the raw dict (keys are checked when the dataclasses are built;
    a key that walks into a non-mapping is reported here)."""
    raw = json.loads(json.dumps(raw, default=str)) if raw else {}
    for key, value in overrides:
        parts = key.split(".")
        if any(not p for p in parts):
            raise BTXError(f"override --{key}: empty key part")
        node = raw
        for j, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise BTXError(f"override --{key}: {'.'.join(parts[: j + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw
