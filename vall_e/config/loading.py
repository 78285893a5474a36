"""Loading the configuration: YAML, then `key.sub=value` overrides, checked against `schema`.

Usage from a command::

    cfg, args = parse_config(argv, parser)   # pulls `yaml=...` and `key=value` out of argv

* `yaml=PATH` loads a YAML file; its folder becomes `cfg.cfg_path`, from which every run path hangs
  (`ckpt/`, `logs/`, `.cache/`, `data.h5`, `metrics.png`), as in the reference implementation.
* `section.key=value` overrides one field; the value is parsed as YAML and checked against the
  field's type, so `trainer.iterations=10` is an int and `dataset.training=[a,b]` a list.
* An unknown key is an error naming it and suggesting the closest known key.
* `help=true` prints every field with its default and meaning.
* A config file of the reference implementation (mrq/vall-e: `models._models`, `speaker_name_getter`,
  ...) is migrated as it loads, with a warning (`vall_e.config.migrate`); one that needs a decision is
  refused with an error that names `python -m vall_e.config migrate`.

Unlike the reference, nothing in a config file is ever evaluated as Python: speaker and group names
come from the path (`{group}/{speaker}/{file}`) through plain format strings.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from vall_e.config.migrate import MIGRATE_COMMAND, REFERENCE, Migration, migrate, reference_keys
from vall_e.config.schema import Config
from vall_e.utils.errors import UserError
from vall_e.utils.io import read_text

logger = logging.getLogger(__name__)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = UserError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and value is None:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError:
                pass
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r} is a section; expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad
        if not math.isfinite(number):
            raise UserError(f"config key {key!r} expects a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = args[:1] or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        k_tp, v_tp = args or (Any, Any)
        return {str(k): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    return value


def _unknown_key(key: str, known: Sequence[str], prefix: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return UserError(f"unknown config key {prefix + key!r}{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in types_:
            raise _unknown_key(str(k), list(types_), prefix)
        kwargs[k] = _coerce(v, types_[k], prefix + k)
    return cls(**kwargs)


# A config is small; more values than this (e.g. YAML aliases expanding exponentially, the
# "billion laughs") is refused before anything walks or copies it.
MAX_CONFIG_VALUES = 100_000


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` (plain data only, no Python objects) that also refuses duplicate keys, which
    YAML would otherwise resolve silently to the last one."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable: the base constructor reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _safe_yaml(text: str, where: str) -> Any:
    """Parse YAML text into plain data; UserError (naming `where`) for anything malformed or hostile."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise UserError(f"{where}: malformed YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: malformed YAML{at}: {problem}") from None
    count, stack = 0, [data]
    while stack:  # iterative: a recursive alias or a huge expansion cannot blow the stack
        x = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise UserError(f"{where}: more than {MAX_CONFIG_VALUES} values (expanded YAML aliases?); "
                            "a config is much smaller")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a one-line error naming it."""
    path = Path(path)
    data = _safe_yaml(read_text(path, "config file"), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"config key {key!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _parse_value(raw: str, key: str = "") -> Any:
    """An override's value as YAML; text that is not valid YAML stays a plain string."""
    if raw == "":
        return ""
    try:
        return _safe_yaml(raw, f"config key {key!r}")
    except UserError as e:
        if "malformed YAML" in str(e) and "nested too deeply" not in str(e):
            return raw
        raise


def split_overrides(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Separate `key=value` arguments (not starting with `-`) from the rest of the command line."""
    overrides: dict[str, str] = {}
    rest: list[str] = []
    for a in argv:
        if "=" in a and not a.startswith("-") and a.split("=", 1)[0].replace(".", "").replace("_", "").isalnum():
            k, v = a.split("=", 1)
            overrides[k] = v
        else:
            rest.append(a)
    return overrides, rest


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Defaults, then the YAML, then the `key=value` overrides; validated against the dataclasses."""
    tree: dict[str, Any] = {}
    cfg_path = Path("data")
    if yaml_path:
        tree = _from_reference(load_yaml(yaml_path), yaml_path)
        cfg_path = Path(yaml_path).parent
    file_tree = copy.deepcopy(tree) if yaml_path else None
    for k, raw in (overrides or {}).items():
        _set_dotted(tree, k, _parse_value(raw, k))
    try:
        return _finish(tree, cfg_path)
    except UserError as e:
        if file_tree is not None:  # the file alone has the same problem: say which file
            try:
                _finish(file_tree, cfg_path)
            except UserError as alone:
                if str(alone) == str(e):
                    raise UserError(f"{yaml_path}: {e}") from None
        raise


def _from_reference(tree: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """`tree` itself, or, for a config in the reference's layout, its migration (with a warning)."""
    keys = reference_keys(tree)
    if not keys:
        return tree
    m = migrate(tree, path)
    if m.decide:
        key, what = m.decide[0]
        more = f" (and {len(m.decide) - 1} more)" if len(m.decide) > 1 else ""
        raise UserError(f"{path}: a config in the reference's layout ({keys[0]}, ...) that cannot load the same way "
                        f"here: {key}: {what}{more}; run `{MIGRATE_COMMAND} {path} > NEW.yaml`, which marks each "
                        "such key, and edit NEW.yaml")
    logger.warning("%s: a config in the reference's layout (%s), migrated as it loads: %s; convert it once with "
                   "`%s %s > NEW.yaml`", path, REFERENCE, m.summary(), MIGRATE_COMMAND, path)
    return m.tree


def migrate_file(path: str | Path) -> Migration:
    """The migration of a reference-layout config file, checked to load as our config."""
    tree = load_yaml(path)
    if not reference_keys(tree):
        raise UserError(f"{path}: no key of the reference's layout ({REFERENCE}); it is a config of ours already")
    m = migrate(tree, path)
    try:
        _finish(copy.deepcopy(m.tree), Path(path).parent)
    except UserError as e:
        raise UserError(f"{path}: migrated, the config does not load: {e}") from None
    return m


def _finish(tree: dict[str, Any], cfg_path: Path) -> Config:
    tree = dict(tree)
    if "cfg_path" in tree:
        value = tree.pop("cfg_path")
        if isinstance(value, bool) or not isinstance(value, (str, int, float, Path)) or not str(value):
            raise UserError(f"config key 'cfg_path' expects a folder path, got {value!r}")
        cfg_path = Path(str(value))
    cfg = _build(Config, tree)
    cfg.cfg_path = cfg_path
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    choices = {
        "dataset.sample_type": (cfg.dataset.sample_type, ("path", "speaker", "group")),
        "trainer.backend": (cfg.trainer.backend, ("local", "deepspeed")),
        "trainer.weight_dtype": (cfg.trainer.weight_dtype, ("float32", "bfloat16", "float16")),
        "inference.weight_dtype": (cfg.inference.weight_dtype, ("float32", "bfloat16", "float16")),
        "hyperparameters.scheduler": (cfg.hyperparameters.scheduler, ("constant", "cosine", "linear", "onecycle")),
        "hyperparameters.optimizer": (cfg.hyperparameters.optimizer.lower(), ("adamw", "sgd", "prodigy", "adamw8bit")),
        "hyperparameters.schedule_clock": (cfg.hyperparameters.schedule_clock, ("steps", "time")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config key {key!r} is {value!r}; choose one of {', '.join(allowed)}")
    for key, rng in (("dataset.phones_range", cfg.dataset.phones_range), ("dataset.duration_range", cfg.dataset.duration_range)):
        if len(rng) != 2 or rng[0] > rng[1]:
            raise UserError(f"config key {key!r} must be [min, max], got {rng!r}")
    if cfg.hyperparameters.schedule_clock == "time" and not cfg.trainer.max_minutes:
        raise UserError("hyperparameters.schedule_clock 'time' needs trainer.max_minutes (the budget the schedule "
                        "is spread over)")
    _check_non_negative(cfg)
    cfg.model.networks()  # every check of the model (vall_e.config.model), before any data is read


# numbers that may be negative; every other number in the config is a count, size, rate or duration
_SIGNED = {"seed"}


def _check_non_negative(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_non_negative(value, key + ".")
        elif key in _SIGNED or isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)) and value < 0:
            raise UserError(f"config key {key!r} must not be negative, got {value!r}")
        elif isinstance(value, list) and any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0
                                             for v in value):
            raise UserError(f"config key {key!r} must not hold negative numbers, got {value!r}")


def help_text(cls: type = Config, prefix: str = "") -> str:
    """Every field with its default and meaning, one per line."""
    lines = []
    inst = cls()
    for f in dataclasses.fields(cls):
        if f.name == "cfg_path":
            continue
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{prefix}{f.name}:  # {f.metadata.get('help', '')}")
            lines.append(help_text(type(value), prefix + f.name + "."))
        else:
            lines.append(f"  {prefix}{f.name} = {json.dumps(value)}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_config(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None,
                 ) -> tuple[Config, argparse.Namespace]:
    """Parse `yaml=`/`key=value` overrides and `help=true`, then the command's own flags.

    A `--yaml PATH` flag, when the parser declares one, is honoured like `yaml=PATH`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    if str(overrides.pop("help", "false")).lower() in ("true", "1", "yes"):
        print(help_text())
        raise SystemExit(0)
    parser = parser or argparse.ArgumentParser()
    args = parser.parse_args(rest)
    yaml_path = overrides.pop("yaml", None) or getattr(args, "yaml", None)
    cfg = load_config(yaml_path, overrides)
    return cfg, args

