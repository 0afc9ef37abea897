"""Flow configuration: pydantic models loaded from YAML with ``dotted.key=value`` overrides.

Unknown keys are errors that name the key and its close matches; every other validation error
names the dotted key, the bad value and the rule.
"""

from __future__ import annotations

import difflib
import importlib
import os
import reprlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.safe_yaml import YamlError, clip
from tasks.safe_yaml import load as load_yaml_text

M = TypeVar("M", bound=BaseModel)

#: the largest configuration file read (a configuration is a few kB)
MAX_CONFIG_BYTES = 16 * 2**20
#: problems listed in one validation error (the rest are counted)
MAX_ERROR_LINES = 20
_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 100, 100, 60


def short_repr(value: Any, limit: int = 120) -> str:
    """A bounded ``repr`` of a user value (never builds the full repr of a huge value)."""
    return clip(_REPR.repr(value), limit)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says which key and how to fix it."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _fields_at(model_cls: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the (nested) model at ``loc``, for suggestions."""
    cls: Any = model_cls
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def _type_hint(err: Any) -> str:
    """What to write instead, for a number of the wrong kind (strict integers: no 4.0, no true)."""
    value = err.get("input")
    if err["type"] == "int_type" and isinstance(value, bool):
        return "; true/false is not a number: write a whole number"
    if err["type"] == "int_type" and isinstance(value, float) and value.is_integer():
        return f"; write a whole number without a decimal point: {int(value)}"
    return ""


def format_validation_error(exc: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    """One line per problem, with the dotted key and a suggestion for unknown keys (user values shown cut short)."""
    lines = []
    errors = exc.errors()
    for err in errors[:MAX_ERROR_LINES]:
        loc = [p for p in err["loc"] if not isinstance(p, int)]
        key = clip(".".join(str(p) for p in err["loc"]))
        msg = clip(err["msg"], 300)
        if err["type"] == "extra_forbidden":
            known = _fields_at(model_cls, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1])[:200], known, n=3, cutoff=0.6)
            hint = (
                f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known keys: {', '.join(known)}"
            )
            lines.append(f"unknown key '{key}'{hint}")
        elif err["type"] == "missing" and err["loc"] and isinstance(err["loc"][-1], int):  # too short a tuple
            parent = clip(".".join(str(p) for p in err["loc"][:-1]))
            lines.append(f"'{parent}': item {err['loc'][-1]} is missing; give a list with all its items")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'; set it in the config file or pass {key}=VALUE")
        elif not err["loc"]:  # a rule across keys (model validator): its message names them
            lines.append(msg.removeprefix("Value error, "))
        else:
            lines.append(f"'{key}': {msg} (got {short_repr(err.get('input'))}){_type_hint(err)}")
    if len(errors) > MAX_ERROR_LINES:
        lines.append(f"... and {len(errors) - MAX_ERROR_LINES} more problems")
    return f"invalid configuration ({clip(source, 300)}):\n  " + "\n  ".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{clip(dotted)}': '{clip(part)}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``[("a.b", 1), ("c", [1, 2])]`` (values read as YAML, bounded as files are)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {short_repr(item)} must look like dotted.key=value")
        try:
            value = load_yaml_text(raw, f"override {short_repr(item)}") if raw.strip() else None
        except YamlError as exc:
            raise ConfigError(str(exc)) from None
        out.append((key.strip(), value))
    return out


def _read_config_text(p: Path) -> str:
    """The text of a config file; one clear line for a missing, non-regular, huge, unreadable or non-UTF-8 file."""
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder; give the path of a YAML file with --config")
    if not p.exists():
        raise ConfigError(f"config file {p} not found; check the --config path")
    if not p.is_file():
        raise ConfigError(f"config file {p} is not a regular file; give the path of a YAML file with --config")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {p} holds {size} bytes; a configuration is at most {MAX_CONFIG_BYTES} "
                "bytes: check the --config path"
            )
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read ({exc.strerror or exc}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with clear errors (bounded aliases, no duplicate keys)."""
    p = Path(path)
    text = _read_config_text(p)
    try:
        data = load_yaml_text(text, f"config file {p}") or {}
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(data).__name__}")
    return data


def ensure_storage_root(configured: str | None) -> Path:
    """The storage root (``storage_root``, else $PATCHFLOW_STORAGE_ROOT, else ./.patchflow), created when missing;
    a ConfigError naming where it came from when it is not a writable folder. Flows call it first."""
    from storage.settings import STORAGE_ROOT_ENV, folder_problem, storage_root, storage_root_origin

    origin = storage_root_origin(configured)
    raw = clip(configured or os.environ.get(STORAGE_ROOT_ENV) or "")
    label, fix = {
        "storage_root": (f"storage_root {raw}", "set storage_root"),
        f"${STORAGE_ROOT_ENV}": (
            f"${STORAGE_ROOT_ENV}={raw}",
            f"set {STORAGE_ROOT_ENV} (or the config key storage_root)",
        ),
    }.get(origin, (origin, f"set storage_root or {STORAGE_ROOT_ENV}"))
    fix += " to a writable folder: results, cache records, locks and features live there"
    try:
        root = storage_root(configured)
    except (OSError, RuntimeError) as exc:  # e.g. ~user that does not exist, a symlink loop
        raise ConfigError(f"{label} cannot be resolved ({clip(exc)}); {fix}") from None
    problem = folder_problem(root)
    if problem:
        where = "" if str(root) == raw else f" ({root})"
        raise ConfigError(f"{label}{where} {problem}; {fix}")
    return root


def load_config(model_cls: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Validated config from an optional YAML file plus overrides."""
    data = load_yaml(path) if path else {}
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return validate_config(model_cls, data, source=str(path) if path else "overrides")


def validate_config(model_cls: type[M], data: dict[str, Any] | M, source: str = "parameters") -> M:
    """Validate a mapping (or pass a model through) with readable errors."""
    if isinstance(data, model_cls):
        return data
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model_cls, source)) from None


def dump_yaml(cfg: BaseModel) -> str:
    """Resolved config as YAML text."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_tree(cfg: BaseModel) -> str:
    """Indented tree of the config (the reference's ``config_tree.txt``)."""
    lines: list[str] = []

    def walk(node: Any, indent: int) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and v:
                lines.append("  " * indent + f"{k}")
                walk(v, indent + 1)
            else:
                lines.append("  " * indent + f"{k}: {v!r}")

    walk(cfg.model_dump(mode="json"), 0)
    return "\n".join(lines) + "\n"


def import_object(spec: str) -> Callable[..., Any]:
    """Object from ``"package.module:name"`` or ``"package.module.name"``."""
    mod_name, sep, attr = spec.partition(":")
    if not sep:
        mod_name, _, attr = spec.rpartition(".")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import {spec!r} ({exc}); use 'package.module:name'") from None
