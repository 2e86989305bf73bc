"""Strict YAML loading, composition and dotted overrides for the config tree.

Precedence, lowest first:

1. the dataclass defaults (``schema.py``);
2. the task preset ``configs/tasks/<task>.yaml`` (``task:`` picks it: imagenet, t2i, nano, ...);
3. the files named in ``defaults:`` (depth first, each relative to the file naming it), then the file itself;
4. the ``per_task.<task>:`` sections of those files, for the task in force;
5. command-line overrides ``a.b.c=value`` (the value is parsed as YAML).

So a method is written once, and ``task: imagenet`` -> ``task: t2i`` (in the file or as ``task=t2i`` on the
command line) is the whole switch between ImageNet and text-to-image.

Every layer is checked against the schema as it is read, so an error names the file (or the override) that
introduced it, the full key path and the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from nanogen.errors import ConfigError

T = TypeVar("T")

COMPOSE_KEYS = ("defaults", "per_task")  # file-level keys that are not part of the tree


# ----------------------------------------------------------------------------------------------------------
# where configs live


def builtin_configs_dir() -> Path:
    """The ``configs/`` tree: inside the installed package, or at the repository root in a checkout."""
    packaged = Path(__file__).resolve().parent.parent / "_configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "configs"


def find_config(path: str | Path) -> Path:
    """A config path as given, else relative to the built-in ``configs/`` tree (so installs work anywhere)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    root = builtin_configs_dir()
    for cand in (root / p, root.parent / p):
        if cand.is_file():
            return cand
    if p.is_dir():
        raise ConfigError(f"config path '{path}' is a directory; pass a .yaml file inside it")
    raise ConfigError(
        f"config file not found: '{path}' (looked in the current directory and in {root}); "
        f"run 'nanogen configs' to list the built-in configs"
    )


def task_preset_path(task: str) -> Path:
    p = builtin_configs_dir() / "tasks" / f"{task}.yaml"
    if not p.is_file():
        known = sorted(f.stem for f in (builtin_configs_dir() / "tasks").glob("*.yaml"))
        raise ConfigError(f"unknown task '{task}'{_suggest(task, known)}; known tasks: {', '.join(known)}")
    return p


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config blocks, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------------
# typed conversion


def _suggest(key: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(source: str, path: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {path}: {msg}")


def coerce(tp: Any, value: Any, path: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert (int -> float, mapping -> dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(source, path, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, path, source)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        _fail(source, path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = _suggest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
            _fail(source, path, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            _fail(source, path, "must be a mapping, got null")
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            _fail(source, path, f"must be a mapping of keys, got {type(value).__name__} {value!r}")
        return build(tp, value, source=source, prefix=path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            _fail(source, path, f"expected a list, got {type(value).__name__} {value!r}")
        return [coerce(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            _fail(source, path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): coerce(item, v, f"{path}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(source, path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(source, path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            _fail(source, path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(source, path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a schema bug, not a user error


def build(cls: type[T], data: dict[str, Any], *, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (partial) mapping, strictly: unknown keys and wrong types raise."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            hint = _suggest(path, valid) or f"; valid keys here: {', '.join(names)}"
            _fail(source, path, f"unknown key{hint}")
        kwargs[key] = coerce(hints[key], value, path, source)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A config (or part of one) as plain YAML-ready data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


# ----------------------------------------------------------------------------------------------------------
# composition


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in ``top`` replaces what ``base`` had.

    A model block (``stage_1`` / ``stage_2``: ``{target, params}``) whose ``target`` changes starts its ``params``
    afresh: parameters belong to the component they were written for (so ``stage_1.target=vae
    stage_1.params={vae_type: ...}`` switches a latent space in one override)."""
    if "target" in top and "params" in base and base.get("target") not in (None, top["target"]):
        base = {k: v for k, v in base.items() if k != "params"}
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclasses.dataclass
class _Layer:
    data: dict[str, Any]
    per_task: dict[str, dict[str, Any]]
    source: str


def _read_layers(path: Path, schema: type, stack: tuple[Path, ...] = ()) -> list[_Layer]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: 'defaults' forms a cycle: {chain}")
    raw = read_yaml(path)
    layers: list[_Layer] = []
    defaults = raw.pop("defaults", None) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of config file paths relative to this file")
    for d in defaults:
        dp = (path.parent / d).resolve()
        if not dp.is_file():
            raise ConfigError(f"{path}: defaults entry '{d}' not found (looked for {dp})")
        layers.extend(_read_layers(dp, schema, (*stack, path)))
    per_task = raw.pop("per_task", None) or {}
    if not isinstance(per_task, dict) or not all(isinstance(v, dict) for v in per_task.values()):
        raise ConfigError(f"{path}: 'per_task' must map task names to config blocks, e.g. per_task: {{t2i: {{...}}}}")
    build(schema, raw, source=str(path))  # validate now, so the error names this file
    for task, block in per_task.items():
        build(schema, block, source=f"{path} (per_task.{task})")
    layers.append(_Layer(raw, per_task, str(path)))
    return layers


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(
            f"command line: cannot parse override '{text}'; write it as key.path=value, e.g. training.global_batch_size=256"
        )
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def override_layer(overrides: list[str], schema: type) -> _Layer:
    data: dict[str, Any] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node: dict[str, Any] = {}
        leaf = node
        for k in keys[:-1]:
            leaf[k] = {}
            leaf = leaf[k]
        leaf[keys[-1]] = value
        build(schema, node, source=f"command-line override '{text}'")
        data = deep_merge(data, node)
    return _Layer(data, {}, "command line")


def compose(path: str | Path | None, overrides: list[str] | None = None, schema: type[T] = None) -> T:  # type: ignore[assignment]
    """Read a config file (with its ``defaults``, task preset and ``per_task``) plus overrides; no resolving."""
    from nanogen.config.schema import Stage2Config

    schema = schema or Stage2Config  # type: ignore[assignment]
    layers = _read_layers(find_config(path), schema) if path is not None else []
    cli = override_layer(list(overrides or []), schema)
    task = None
    for layer in [*layers, cli]:
        task = layer.data.get("task", task)
    merged: dict[str, Any] = {}
    if task is not None and "task" in {f.name for f in dataclasses.fields(schema)}:
        preset = task_preset_path(str(task))
        preset_data = read_yaml(preset)
        build(schema, preset_data, source=str(preset))
        merged = deep_merge(merged, preset_data)
    for layer in layers:
        merged = deep_merge(merged, layer.data)
    for layer in layers:
        unknown = [t for t in layer.per_task if t not in _known_tasks()]
        if unknown:
            raise ConfigError(
                f"{layer.source}: per_task.{unknown[0]}: unknown task{_suggest(unknown[0], _known_tasks())}"
            )
        if task in layer.per_task:
            merged = deep_merge(merged, layer.per_task[task])
    merged = deep_merge(merged, cli.data)
    return build(schema, merged, source=str(path) if path is not None else "command line")


def _known_tasks() -> list[str]:
    return sorted(f.stem for f in (builtin_configs_dir() / "tasks").glob("*.yaml"))
