"""Building a Config: preset < profile < YAML file < command-line `section.key=value`, each value type-checked.

A wrong key, type or choice is a ConfigError of one line naming where it came from, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from transfgu_dist.config.presets import PRESETS, PROFILES
from transfgu_dist.config.schema import ARCHS, Config, ConfigError, derive_sizes, worker_range


class _Loader(yaml.SafeLoader):
    """YAML with floats in any notation: `1e-4`, `2E3`, `1.0e-4` (YAML 1.1 wants a dot and a signed exponent)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML text; a syntax error names `where` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}: not valid YAML ({problem}{at})") from e


def _parse_scalar(text: str) -> Any:
    return load_yaml(text, f"command line value '{text}'")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert `value` to the annotated type `tp` (str annotations resolved by the caller)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} = {value!r}: expected one of {', '.join(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, item, where) for v in value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp in (int, str, bool) and not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def set_key(cfg: Config, dotted: str, value: Any, where: str) -> None:
    """Set `section.key` to `value`, type-checked; errors name `where` (a file, the command line, ...)."""
    target = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not is_dataclass(target) or p not in {f.name for f in fields(target)}:
            raise ConfigError(f"{where}: unknown section '{p}' in key '{dotted}'")
        target = getattr(target, p)
    hints = typing.get_type_hints(type(target))
    key = parts[-1]
    if not is_dataclass(target) or key not in hints or is_dataclass(hints[key]):
        known = ", ".join(sorted(f.name for f in fields(target))) if is_dataclass(target) else ""
        raise ConfigError(f"{where}: unknown key '{dotted}' (known keys here: {known})")
    setattr(target, key, _coerce(value, hints[key], f"{where}: key '{dotted}'"))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preset: str | None = None,
    profile: str | None = None,
) -> Config:
    """Build a Config: preset < profile < YAML file < `key=value` overrides. The file may name `preset`/`profile`."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (expected a YAML file of config sections)")
        tree = load_yaml(p.read_text(), str(p)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
    cli: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value")
        key, text = item.split("=", 1)
        cli[key.strip()] = _parse_scalar(text)
    preset = cli.pop("preset", None) or preset or tree.pop("preset", None) or "synthetic"
    profile = cli.pop("profile", None) or profile or tree.pop("profile", None) or "reference"
    tree.pop("preset", None), tree.pop("profile", None)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}' (known: {', '.join(PROFILES)})")
    cfg = Config(preset=preset, profile=profile, output=f"outputs/{preset}")
    PRESETS[preset](cfg)
    for where, values in (
        (f"profile {profile}", PROFILES[profile]),
        (str(path), _flatten(tree)),
        ("command line", cli),
    ):
        for key, value in values.items():
            set_key(cfg, key, value, where)
    derive_sizes(cfg)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks with messages that name the key (choices and types are checked by `set_key`)."""
    if cfg.cluster.k_fg < 1 or cfg.cluster.k_bg < 0:
        raise ConfigError("keys 'cluster.k_fg' >= 1 and 'cluster.k_bg' >= 0 are required")
    if cfg.cluster.k_bg > 0 and cfg.crops.prior != "attention":
        raise ConfigError(
            f"key 'cluster.k_bg' = {cfg.cluster.k_bg} needs crops.prior = attention "
            f"(prior '{cfg.crops.prior}' yields no background crops)"
        )
    if not cfg.train.round_epochs or min(cfg.train.round_epochs) < 1:
        raise ConfigError("key 'train.round_epochs' must list at least one round of >= 1 epoch")
    if cfg.train.epoch_repeat < 1:
        raise ConfigError(f"key 'train.epoch_repeat' = {cfg.train.epoch_repeat}: expected an integer >= 1")
    _check_patch_sizes(cfg)
    _check_resources(cfg)


def _check_resources(cfg: Config) -> None:
    r, workers = cfg.resources, cfg.train.num_workers
    if isinstance(workers, tuple) and (len(workers) != 2 or not 1 <= workers[0] <= workers[1]):
        raise ConfigError(
            f"key 'train.num_workers' = {list(workers)}: expected an integer or [min, max] with 1 <= min <= max"
        )
    if worker_range(workers)[0] < 1:
        raise ConfigError(f"key 'train.num_workers' = {workers}: expected an integer >= 1")
    if not 1 <= r.pool_min <= r.pool_max:
        raise ConfigError(
            f"keys 'resources.pool_min' = {r.pool_min}, 'resources.pool_max' = {r.pool_max}: expected 1 <= min <= max"
        )
    if r.actor_gpus is not None and r.actor_gpus < 0:
        raise ConfigError(f"key 'resources.actor_gpus' = {r.actor_gpus}: expected a number >= 0 (or null: auto)")
    if r.decode_cpus <= 0:
        raise ConfigError(f"key 'resources.decode_cpus' = {r.decode_cpus}: expected a number > 0")


def _check_patch_sizes(cfg: Config) -> None:
    """Every size the encoder sees is a multiple of its patch (training crops are half of train.image_size)."""
    if cfg.encoder.arch not in ARCHS:
        raise ConfigError(f"key 'encoder.arch' = {cfg.encoder.arch!r}: expected one of {', '.join(ARCHS)}")
    p = ARCHS[cfg.encoder.arch][0]
    for key, sizes, step in (
        ("crops.image_size", cfg.crops.image_size, p),
        ("crops.crop_size", (cfg.crops.crop_size,), p),
        ("pseudo.image_size", cfg.pseudo.image_size, p),
        ("eval.image_size", cfg.eval.image_size, p),
        ("train.image_size", cfg.train.image_size, 2 * p),
    ):
        if any(s % step for s in sizes):
            raise ConfigError(
                f"key '{key}' = {sizes if len(sizes) > 1 else sizes[0]}: expected multiples of {step} "
                f"(patch size {p} of encoder '{cfg.encoder.arch}')"
            )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), e.g. for YAML dumps and MLflow params."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {
        f.name: (
            {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
            if is_dataclass(getattr(cfg, f.name))
            else plain(getattr(cfg, f.name))
        )
        for f in fields(cfg)
    }


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
