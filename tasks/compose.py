"""Quadra-style config composition: ``experiment=NAME``, ``--config FILE`` with a ``defaults:`` list, group overrides
(``backbone=resnet18``), ``+key=value`` / ``~key``, composed with hydra-core's compose API
(``initialize_config_dir`` + ``compose``) over the packaged ``configs/`` tree plus the user's config folders
(``--config-dir DIR``, else ``./configs`` when it holds an ``experiment/`` folder).

User files are read with the safe-YAML rules first (:mod:`tasks.safe_yaml`: no tags, bounded aliases, no key given
twice). ``dotted.key=value`` overrides are applied after composition with plain mode's YAML values, so they may set
any key (patchflow's own included) and interpolations see them. :func:`compose_config` returns plain data;
:mod:`tasks.experiment` maps it onto the flows' pydantic configs, which validate it as they validate a plain file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, _read_config_text, load_yaml, parse_overrides
from tasks.safe_yaml import YamlError, clip
from tasks.safe_yaml import load as load_yaml_text

#: the packaged config tree (Quadra's layout)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: at most this many YAML files are read from the user's config folders
MAX_USER_FILES = 2000
_FILE_GROUP = "_config_file_"
_HYDRA_PREFIXES = ("+", "~")


def group_names(config_dirs: Sequence[Path] = ()) -> set[str]:
    """Top-level config groups (folders) of the packaged tree and of ``config_dirs``."""
    return {p.name for d in (CONFIG_DIR, *config_dirs) if d.is_dir() for p in d.iterdir() if p.is_dir()}


def user_config_dirs(config_dirs: Sequence[str] | None) -> list[Path]:
    """The user's config folders: ``--config-dir`` ones (a folder holding ``experiment/``, or an experiment folder
    itself), else ``./configs`` when it has an ``experiment/`` folder and is not the packaged tree."""
    out: list[Path] = []
    for raw in config_dirs or ():
        d = Path(raw).expanduser().resolve()
        if not d.is_dir():
            raise ConfigError(f"--config-dir {clip(raw)} is not a folder; give the folder that holds experiment/")
        out.append(d)
    local = Path("configs").resolve()
    if not out and (local / "experiment").is_dir() and local != CONFIG_DIR.resolve():
        out.append(local)
    return out


def wants_composition(config_file: str | None, config_dirs: Sequence[str] | None, overrides: Sequence[str]) -> bool:
    """Whether a command line asks for composition: ``--config-dir``, a config file with a ``defaults:`` list, or an
    override that selects a group (``experiment=...``, ``backbone=...``) or uses ``+``/``~``."""
    if config_dirs:
        return True
    if config_file and "defaults" in load_yaml(config_file):
        return True
    groups = group_names()
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith(_HYDRA_PREFIXES) or ("." not in key and key in groups):
            return True
    return False


def check_user_yaml(dirs: Sequence[Path], config_file: str | None) -> None:
    """Read every YAML file of the user's config folders (and the config file) with the safe-YAML rules."""
    files = [Path(config_file)] if config_file else []
    for d in dirs:
        for root, _, names in os.walk(d):
            files += [Path(root) / n for n in sorted(names) if n.endswith((".yaml", ".yml"))]
            if len(files) > MAX_USER_FILES:
                raise ConfigError(
                    f"config folder {d} holds more than {MAX_USER_FILES} YAML files; give --config-dir the folder "
                    "that holds experiment/"
                )
    for i, f in enumerate(files):
        try:
            data = load_yaml_text(_read_config_text(f), f"config file {f}")
        except YamlError as exc:
            raise ConfigError(str(exc)) from None
        if isinstance(data, dict) and "hydra" in data and ((i == 0 and config_file) or "experiment" in f.parts):
            raise ConfigError(
                f"config file {f}: hydra: patchflow runs no Hydra app (run folder: <core.runs_folder>/<core.name>/"
                "<timestamp>); remove it and set core.runs_folder or core.name instead"
            )


def split_overrides(overrides: Sequence[str], groups: set[str]) -> tuple[list[str], list[str]]:
    """``(hydra overrides, value overrides)``: group selections and ``+``/``~`` go to Hydra; ``dotted.key=value`` is
    applied after composition (any key, values read as YAML as in plain mode)."""
    hydra: list[str] = []
    values: list[str] = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        top = key.split(".")[0].split("/")[0]
        if top.lstrip("+~") == "hydra":
            raise ConfigError(
                f"override {clip(key)}: patchflow runs no Hydra app (run folder: <core.runs_folder>/<core.name>/"
                "<timestamp>; no multirun); set core.runs_folder or core.name instead"
            )
        is_group = "." not in key and top in groups
        (hydra if key.startswith(_HYDRA_PREFIXES) or is_group else values).append(item)
    return hydra, values


def _file_as_experiment(config_file: str, tmp: Path) -> str:
    """Copy the config file into ``tmp/experiment/`` (global package, as Quadra's experiments are); its name."""
    text = _read_config_text(Path(config_file))
    if "@package" not in "".join(text.splitlines(keepends=True)[:5]):
        text = "# @package _global_\n" + text
    dest = tmp / "experiment" / _FILE_GROUP / (Path(config_file).stem + ".yaml")
    dest.parent.mkdir(parents=True)
    dest.write_text(text, encoding="utf-8")
    return f"{_FILE_GROUP}/{dest.stem}"


def _hydra_error(exc: BaseException) -> ConfigError:
    """A composition failure as one line (Hydra's first line, its option lists left out)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    first = clip(lines[0] if lines else type(exc).__name__, 300)
    hint = ""
    if "experiment" in first and ("Could not find" in first or "not found" in first):
        hint = "; put it under ./configs/experiment/ or give its configs folder with --config-dir DIR"
    elif "Could not override" in first or "Key not in" in first:
        hint = "; write +key=value to add a key, ~key to remove one"
    return ConfigError(f"cannot compose the experiment: {first}{hint}")


def compose_config(
    config_file: str | None, config_dirs: Sequence[str] | None, overrides: Sequence[str]
) -> tuple[dict[str, Any], str]:
    """Compose the experiment (and ``config_file``) with Hydra; ``(plain resolved data, source label)``.

    Mandatory values left as ``???`` are dropped, so validation names them as missing keys."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    dirs = user_config_dirs(config_dirs)
    check_user_yaml(dirs, config_file)
    hydra_ov, value_ov = split_overrides(overrides, group_names(dirs))
    values = parse_overrides(value_ov)
    label = " ".join(o for o in hydra_ov if o.startswith("experiment=")) or "configs"
    with tempfile.TemporaryDirectory(prefix="patchflow-compose-") as tmp:
        if config_file:
            if any(o.startswith("experiment=") for o in hydra_ov):
                raise ConfigError("give either --config FILE or experiment=NAME, not both")
            hydra_ov.append(f"experiment={_file_as_experiment(config_file, Path(tmp))}")
            label = f"config file {config_file}"
        search = ",".join(f"'file://{d}'" for d in [*dirs, Path(tmp)])
        try:
            with initialize_config_dir(str(CONFIG_DIR), version_base=None, job_name="patchflow"):
                cfg = compose("config", overrides=[*hydra_ov, f"hydra.searchpath=[{search}]"])
            OmegaConf.set_struct(cfg, False)
            for key, value in values:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
            data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except (HydraException, OmegaConfBaseException) as exc:
            raise _hydra_error(exc) from None
    assert isinstance(data, dict)
    return _drop_missing(data), label


def _drop_missing(node: Any) -> Any:
    """``node`` without the values Hydra marks mandatory-but-unset (``???``)."""
    if isinstance(node, dict):
        return {k: _drop_missing(v) for k, v in node.items() if v != "???"}
    if isinstance(node, list):
        return [_drop_missing(v) for v in node]
    return node
