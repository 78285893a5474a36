"""The reference implementation's config files (mrq/vall-e, the layout of its commit 35d78a2) in ours.

`python -m vall_e.config migrate OLD.yaml > NEW.yaml` writes the same settings in our layout, headed by
comments that say what became of every key. Loading such a file directly (`yaml=OLD.yaml` on any
command) migrates it in memory and warns once; a file with something that needs a decision is refused
with a one-line error that names the migrate command (`vall_e.config.loading`).

What "the same settings" means:

* a key both layouts have, with the same meaning, is copied; a key whose name or values differ is
  translated (`models._models[]`, `dataset.speaker_name_getter`, `hyperparameters.scheduler_type`, ...);
* a key the file leaves out takes the reference's default where ours differs and the difference changes
  what is trained: the data filters and sampling, the model section, gradient accumulation, the LR
  schedule, precision and activation checkpointing. Evaluation, logging, checkpoint and worker settings
  keep our defaults;
* a key we have no use for is listed as ignored, with the reason;
* anything we cannot do the same way (an `arch_type` we do not have, a speaker-name lambda of another
  shape, a key neither layout knows) needs a decision: the output keeps our default and says so.

The network is ours either way (docs/reference-differences.md): `arch_type: retnet` trains our RetNet.

Nothing in the file is evaluated. A `speaker_name_getter` lambda is parsed with `ast` (parsing runs no
code) and translated only when it is an f-string or a `+` chain of literal text, `p.parts[-3]` (the
group) and `p.parts[-2]` (the speaker folder), as in the reference's own `f'{p.parts[-3]}_{p.parts[-2]}'`.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import os
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from vall_e.config.model import BACKBONES
from vall_e.config.schema import Config

REFERENCE = "mrq/vall-e, the layout of its commit 35d78a2"
MIGRATE_COMMAND = "python -m vall_e.config migrate"

_MODEL_ENTRY: dict[str, Any] = {  # the reference's `Model` dataclass: one entry of models._models
    "name": "", "version": 1, "size": "full", "resp_levels": 1, "prom_levels": 8, "tasks": 8, "langs": 1,
    "experts": 1, "arch_type": "retnet", "training": True, "interleave": False, "p_ar_level": "auto",
    "frozen_params": [],
}

# Every key of the reference's schema at 35d78a2 (its vall_e/config.py) with its default.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "cfg_path": None, "device": "cuda", "mode": "training", "experimental": False,
    "dataset.training": [], "dataset.validation": [], "dataset.noise": [], "dataset.temp": [],
    "dataset.speaker_name_getter": "lambda p: f'{p.parts[-3]}_{p.parts[-2]}'",
    "dataset.speaker_group_getter": "lambda p: f'{p.parts[-3]}'",
    "dataset.speaker_languages": {}, "dataset.hdf5_name": "data.h5", "dataset.use_hdf5": False,
    "dataset.use_metadata": False, "dataset.hdf5_flag": "a", "dataset.validate": True, "dataset.workers": 8,
    "dataset.cache": True, "dataset.phones_range": [4, 256], "dataset.duration_range": [1.0, 12.0],
    "dataset.min_utterances": 2, "dataset.random_utterance": 1.0, "dataset.max_prompts": 3,
    "dataset.prompt_duration": 3.0, "dataset.max_resps": 1, "dataset.p_resp_append": 1.0,
    "dataset.sample_type": "path", "dataset.tasks_list": ["tts"],
    "models._max_levels": 0, "models._prom_levels": 1,
    "models._models": [{**_MODEL_ENTRY, "name": "ar", "resp_levels": 1},
                       {**_MODEL_ENTRY, "name": "nar", "resp_levels": 7}],
    "hyperparameters.batch_size": 8, "hyperparameters.gradient_accumulation_steps": 32,
    "hyperparameters.gradient_clipping": 100, "hyperparameters.optimizer": "Adamw",
    "hyperparameters.torch_optimizer": False, "hyperparameters.optimizer_params": {},
    "hyperparameters.learning_rate": 3.25e-4, "hyperparameters.scheduler_type": "",
    "hyperparameters.scheduler_params": {},
    "evaluation.batch_size": 64, "evaluation.frequency": 250, "evaluation.size": 64, "evaluation.steps": 500,
    "evaluation.ar_temperature": 1.0, "evaluation.nar_temperature": 0.2, "evaluation.load_disabled_engines": True,
    "trainer.iterations": 100_000, "trainer.save_tag": "step", "trainer.load_tag": None, "trainer.save_on_oom": True,
    "trainer.save_on_quit": True, "trainer.export_on_save": False, "trainer.export_on_quit": False,
    "trainer.save_frequency": 100, "trainer.keep_last_checkpoints": 0, "trainer.load_state_dict": False,
    "trainer.load_states": True, "trainer.strict_loading": True, "trainer.load_module_only": False,
    "trainer.restart_step_count": False, "trainer.activation_checkpointing": True,
    "trainer.aggressive_optimizations": False, "trainer.check_for_oom": True, "trainer.gc_mode": None,
    "trainer.load_disabled_engines": False, "trainer.weight_dtype": "float16", "trainer.amp": False,
    "trainer.load_webui": False, "trainer.backend": "local",
    "trainer.deepspeed.zero_optimization_level": 0, "trainer.deepspeed.use_compression_training": False,
    "trainer.deepspeed.compression_bits": 8, "trainer.deepspeed.inferencing": False,
    "inference.backend": "local", "inference.weight_dtype": "float32", "inference.amp": False,
    "inference.normalize": False, "inference.use_vocos": True, "inference.recurrent_chunk_size": 0,
    "inference.recurrent_forward": False,
    "bitsandbytes.enabled": False, "bitsandbytes.injects": False, "bitsandbytes.linear": True,
    "bitsandbytes.embedding": True, "bitsandbytes.bitnet": False,
}

_JOINED = "joined multi-utterance targets (experimental in the reference) are not implemented"
_RECURRENT = "the AR always decodes incrementally (KV cache, or RetNet's recurrent state)"
_UNUSED = "unused by the reference itself"
IGNORED: dict[str, str] = {
    "mode": "each command knows whether it trains or infers",
    "experimental": "its experimental prompt trimming and joined targets are not implemented",
    "dataset.temp": _UNUSED,
    "dataset.use_metadata": "each speaker folder's metadata.json listing is always used",
    "dataset.hdf5_flag": "data.h5 is read-only while training; `python -m vall_e.data --action hdf5` writes it",
    "dataset.cache": "listings are cached in each speaker folder's metadata.json, not in diskcache",
    "dataset.max_resps": _JOINED,
    "dataset.p_resp_append": _JOINED,
    "dataset.tasks_list": "text-to-speech is the only task (the reference's other tasks were commented out)",
    "hyperparameters.torch_optimizer": "the optimizer is always built here (torch, bitsandbytes or prodigyopt), "
                                       "also under DeepSpeed",
    "evaluation.load_disabled_engines": _UNUSED,
    "trainer.save_tag": "checkpoints are always tagged by their step",
    "trainer.save_on_oom": _UNUSED + "; an out-of-memory batch is skipped and counted (trainer.check_for_oom)",
    "trainer.aggressive_optimizations": "no moving batches to the CPU before the backward pass; see the README's "
                                        "'Training with little memory'",
    "trainer.gc_mode": "no forced garbage collection",
    "trainer.load_disabled_engines": _UNUSED,
    "trainer.load_webui": _UNUSED,
    "trainer.deepspeed.inferencing": "inference does not run through DeepSpeed",
    "inference.backend": "there is one inference engine",
    "inference.amp": "inference runs in inference.weight_dtype",
    "inference.normalize": "EnCodec's normalize flag stays off (the reference: 'do NOT enable')",
    "inference.use_vocos": "the codec's own decoder turns codes into audio",
    "inference.recurrent_chunk_size": _RECURRENT,
    "inference.recurrent_forward": _RECURRENT,
    "bitsandbytes.injects": "nothing is monkey-patched globally; bitsandbytes.linear swaps the backbone's layers",
    "bitsandbytes.embedding": "embeddings stay in full precision",
    "models._max_levels": "synthesis decodes all model.n_levels levels (--max-nar-levels decodes fewer)",
}
_ENTRY_IGNORED = {
    "version": "the reference's embedding layouts; ours is one: a table per level and a language embedding "
               "(its version 3)",
    "tasks": "the reference's task embedding was created but never used; text-to-speech is the only task",
    "p_ar_level": _UNUSED + "; model.p_ar 0 (the default) draws levels uniformly, as the reference did",
    "interleave": "false: the split AR + NAR, which is ours",
    "training": "true: every network in the file is trained",
}

# Keys of the reference that a file leaves out and that take its default here, where ours differs
# (the ones that change what is trained). The model section and the schedule are filled by their
# translators below.
FILLED = ("dataset.phones_range", "dataset.duration_range", "dataset.sample_type",
          "hyperparameters.gradient_accumulation_steps", "trainer.activation_checkpointing",
          "trainer.weight_dtype", "trainer.amp")


@dataclass
class Migration:
    """A migrated config: our tree, and what became of each of the reference's keys."""

    tree: dict[str, Any] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)  # same key, same meaning
    translated: list[str] = field(default_factory=list)  # "old -> new" lines
    filled: list[str] = field(default_factory=list)  # the reference's defaults for keys the file leaves out
    kept: list[str] = field(default_factory=list)  # keys that are already ours
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    decide: list[tuple[str, str]] = field(default_factory=list)  # (key, what needs a decision)
    _sources: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: Any, source: str, filled: bool = False) -> bool:
        """Our `key` = `value`, coming from the reference's `source` (or, `filled`, from its default,
        which gives way to a key the file sets). False when the key was already set."""
        if key in self._sources:
            if not filled and self._sources[key] != source:
                self.decide.append((source, f"sets {key}, which {self._sources[key]} sets too"))
            return False
        self._sources[key] = source
        node = self.tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = copy.deepcopy(value)
        return True

    def header(self, old: str) -> str:
        """The comment block that heads a migrated file."""
        out = [f"Migrated with `{MIGRATE_COMMAND} {old}` from a config of the reference implementation",
               f"({REFERENCE}). Nothing in it was evaluated.", ""]

        def block(title: str, lines: list[str]) -> None:
            if lines:
                out.append(title)
                for x in lines:
                    out.extend(textwrap.wrap(x, 106, initial_indent="  ", subsequent_indent="      "))
        order = list(OURS)
        copied = sorted(self.copied, key=lambda k: order.index(k) if k in order else len(order))
        if copied:
            out.append("Copied (the same key, the same meaning):")
            out.extend(textwrap.wrap(", ".join(copied), 106, initial_indent="  ", subsequent_indent="  "))
        block("Translated:", self.translated)
        block("The reference's default for a key the file leaves out, where ours differs:", self.filled)
        block("Kept (keys of ours):", self.kept)
        block("Ignored (no use here):", [f"{k}: {why}" for k, why in self.ignored])
        block("NEEDS A DECISION (left at our default):", [f"{k}: {what}" for k, what in self.decide])
        return "\n".join(("# " + line).rstrip() for line in out) + "\n"

    def to_yaml(self, old: str) -> str:
        """The file `migrate OLD` writes: the header, then our config (mappings in block style, lists
        in flow style)."""
        return self.header(old) + yaml.dump(self.tree, Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    def summary(self) -> str:
        n = len(self.copied) + len(self.translated)
        text = (f"{n} keys copied or translated, {len(self.filled)} reference defaults filled in, "
                f"{len(self.ignored)} ignored")
        return text + (f"; {len(self.decide)} NEED A DECISION" if self.decide else "")


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists: `training: [a, b]`, as our example config writes them."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


# ------------------------------------------------------------------------------ our schema

def _our_leaves(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Our keys (dotted) -> their default, down to the leaves (a dict-typed field is a leaf)."""
    out: dict[str, Any] = {}
    inst = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_our_leaves(hints[f.name], prefix + f.name + "."))
        else:
            out[prefix + f.name] = value
    return out


OURS = _our_leaves()


def _ordered(tree: dict[str, Any], cls: type = Config) -> dict[str, Any]:
    """`tree` with its keys in our schema's order (sections and the keys in them)."""
    hints = typing.get_type_hints(cls)
    order = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for k in sorted(tree, key=lambda k: order.index(k) if k in order else len(order)):
        v = tree[k]
        out[k] = _ordered(v, hints[k]) if isinstance(v, dict) and dataclasses.is_dataclass(hints.get(k)) else v
    return out


def _flatten(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    leaves = {k for k, v in REFERENCE_DEFAULTS.items() if isinstance(v, dict)} | set(OURS)
    for k, v in node.items():
        key = prefix + str(k)
        if isinstance(v, dict) and key not in leaves:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def reference_keys(tree: dict[str, Any]) -> list[str]:
    """The keys of `tree` that only the reference's layout has (empty for a config of ours)."""
    keys = [k for k, _ in _flatten(tree)]
    return [k for k in keys if k not in OURS and (k in REFERENCE_DEFAULTS or k.split(".")[0] == "models")]


# ------------------------------------------------------------------------------ speaker names

def _path_part(node: ast.AST, arg: str) -> str | None:
    """`p.parts[-3]` -> "group", `p.parts[-2]` -> "speaker" (the folders above the file)."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parts"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == arg
            and isinstance(node.slice, ast.UnaryOp) and isinstance(node.slice.op, ast.USub)
            and isinstance(node.slice.operand, ast.Constant) and type(node.slice.operand.value) is int):
        return {3: "group", 2: "speaker"}.get(node.slice.operand.value)
    return None


def _pieces(node: ast.AST, arg: str) -> list[str] | None:
    """The name a lambda body builds, as our format pieces; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value.replace("{", "{{").replace("}", "}}")]
    if isinstance(node, ast.JoinedStr):
        out: list[str] = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue):
                part = _path_part(v.value, arg) if v.conversion == -1 and v.format_spec is None else None
                if part is None:
                    return None
                out.append("{" + part + "}")
            else:
                sub = _pieces(v, arg)
                if sub is None:
                    return None
                out += sub
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _pieces(node.left, arg), _pieces(node.right, arg)
        return None if left is None or right is None else left + right
    part = _path_part(node, arg)
    return None if part is None else ["{" + part + "}"]


def speaker_format(getter: Any) -> str | None:
    """Our `dataset.speaker_name_format` for one of the reference's name lambdas (given as text), or
    None when it is not of a shape we translate. The text is parsed, never evaluated."""
    if not isinstance(getter, str):
        return None
    try:
        node = ast.parse(getter.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    a = getattr(node, "args", None)
    if (not isinstance(node, ast.Lambda) or len(a.args) != 1 or a.posonlyargs or a.vararg or a.kwonlyargs
            or a.kwarg or a.defaults):
        return None
    pieces = _pieces(node.body, a.args[0].arg)
    return None if pieces is None else "".join(pieces)


# ------------------------------------------------------------------------------ the translators

class _Reader:
    """The file's keys (flat), with the reference's defaults behind them."""

    def __init__(self, tree: dict[str, Any], source: Path | None) -> None:
        self.file = dict(_flatten(tree))
        self.source = source
        self.used: set[str] = set()

    def given(self, key: str) -> bool:
        return key in self.file

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.file.get(key, REFERENCE_DEFAULTS.get(key))


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _copy(m: Migration, r: _Reader, key: str, value: Any | None = None, our: str | None = None) -> None:
    """A key with the same meaning here; given in the file, or (in FILLED) the reference's default."""
    our = our or key
    value = r.get(key) if value is None else value
    if r.given(key):
        m.set(our, value, key)
        m.copied.append(key) if our == key else m.translated.append(f"{key} -> {our}")
    elif key in FILLED and value != OURS[our] and m.set(our, value, key, filled=True):
        m.filled.append(f"{our}: {_show(value)} (ours: {_show(OURS[our])})")


def _dataset_dirs(m: Migration, r: _Reader, key: str) -> None:
    """Speaker folders: relative to the working directory in the reference, to the config's folder
    (cfg_path) here. Rewritten for a file that sits where OLD.yaml does, the working directory being
    the one the reference ran in."""
    dirs = r.get(key)
    if not r.given(key):
        return
    if r.source is None or not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        return _copy(m, r, key)
    base = os.path.abspath(str(r.get("cfg_path") or r.source.parent))
    new = [d if os.path.isabs(d) else os.path.relpath(os.path.abspath(d), base) for d in dirs]
    m.set(key, new, key)
    if new == dirs:
        m.copied.append(key)
    else:
        m.translated.append(f"{key} {dirs} -> {new} (relative to the working directory there, to the config's "
                            "folder here)")


def _speakers(m: Migration, r: _Reader) -> None:
    key = "dataset.speaker_name_getter"
    getter = r.get(key)
    fmt = speaker_format(getter)
    if fmt is None:
        m.decide.append((key, f"{getter!r} is not a lambda of p.parts[-3] (the group), p.parts[-2] (the speaker "
                              "folder) and text; write dataset.speaker_name_format ({group}, {speaker}) by hand"))
    elif r.given(key):
        m.set("dataset.speaker_name_format", fmt, key)
        m.translated.append(f"{key} {getter!r} -> dataset.speaker_name_format {fmt!r}")
    key = "dataset.speaker_group_getter"
    getter = r.get(key)
    if speaker_format(getter) != "{group}":
        m.decide.append((key, f"{getter!r}: the group is always the folder above the speaker folder here "
                              "(p.parts[-3])"))
    elif r.given(key):
        m.ignored.append((key, "the group is always the folder above the speaker folder, as this lambda says"))


def _validation(m: Migration, r: _Reader) -> None:
    if not r.get("dataset.validation") and m.set("dataset.validation_fraction", 0.0, "dataset.validation",
                                                 filled=True):
        m.filled.append("dataset.validation_fraction: 0.0 (ours: 0.05): the reference trains on every utterance "
                        "of dataset.training and holds none out")


def _model_size(size: Any) -> tuple[Any, dict[str, Any], str]:
    """(our size, other model keys, a note) for a reference `size`."""
    if not isinstance(size, dict):
        return size, {}, ""
    names = {"dim": "d_model", "heads": "n_heads", "layers": "n_layers"}
    ours = {names.get(k, k): v for k, v in size.items() if k != "tokens"}
    extra = {"model.n_codes": size["tokens"]} if "tokens" in size else {}
    return ours, extra, (" (the reference ignored a dict size and built 'full'; taken as written here: "
                         "docs/reference-differences.md #10)")


def _models(m: Migration, r: _Reader) -> None:
    key = "models._models"
    entries = r.get(key)
    src = key if r.given(key) else f"{key} (the reference's default: ar and nar)"
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        m.decide.append((key, f"{entries!r}: expected a list of model entries"))
        return
    full = [{**_MODEL_ENTRY, **e} for e in entries]
    names = sorted(str(e["name"]) for e in full)
    kind = {("ar+nar",): "ar+nar", ("ar", "nar"): "ar,nar"}.get(tuple(names))
    if kind is None:
        m.decide.append((key, f"networks {names}: we train ar+nar, or ar and nar together"))
        return
    if m.set("model.kind", kind, key, filled=not r.given(key)):
        (m.translated if r.given(key) else m.filled).append(f"{src} names {names} -> model.kind {kind!r}")

    def one(name: str) -> tuple[Any, bool]:
        values = [e[name] for e in full]
        if any(v != values[0] for v in values):
            m.decide.append((f"{key}[].{name}", f"{values} differ between the networks; ours has one for both"))
            raise LookupError
        return values[0], r.given(key) and any(name in e for e in entries)

    for name, ours in (("arch_type", "model.backbone"), ("size", "model.size"), ("experts", "model.experts"),
                       ("langs", "model.n_langs"), ("frozen_params", "model.frozen_params")):
        try:
            value, given = one(name)
        except LookupError:
            continue
        note, extra = "", {}
        if name == "arch_type" and value not in BACKBONES:
            m.decide.append((f"{key}[].arch_type", f"{value!r} has no backbone here; choose one of "
                                                   f"{', '.join(BACKBONES)} (model.backbone)"))
            continue
        if name == "size":
            value, extra, note = _model_size(value)
        if name == "frozen_params" and value:
            note = " (parameter names are ours, e.g. backbone., text_emb.: check the prefixes)"
        if not given and value == OURS[ours]:
            continue
        if not m.set(ours, value, f"{key}[].{name}", filled=not given):
            continue
        for k, v in extra.items():
            m.set(k, v, f"{key}[].size.tokens")
            m.translated.append(f"{key}[].size.tokens -> {k} {v}")
        if given:
            m.translated.append(f"{key}[].{name} -> {ours} {_show(value)}{note}")
        else:
            m.filled.append(f"{ours}: {_show(value)} (ours: {_show(OURS[ours])}), the reference's default {name}")

    # levels: the networks' outputs (ar+nar: all of them; the pair: 1 + the NAR's), the prompt the same here
    by_name = {e["name"]: e for e in full}
    if kind == "ar+nar":
        levels = by_name["ar+nar"]["resp_levels"]
    else:
        levels = by_name["nar"]["resp_levels"] + 1 if isinstance(by_name["nar"]["resp_levels"], int) else None
        if by_name["ar"]["resp_levels"] != 1:
            m.decide.append((f"{key}[ar].resp_levels", f"{by_name['ar']['resp_levels']!r}: an AR predicts level 0 only"))
    prompt = max([r.get("models._prom_levels") or 0] + [e["prom_levels"] for e in full if isinstance(e["prom_levels"], int)])
    if not isinstance(levels, int) or levels < 2:
        m.decide.append((f"{key}[].resp_levels", f"{levels!r} levels: the model needs at least 2"))
    elif not r.given(key) and levels == OURS["model.n_levels"]:
        pass  # the reference's default pair has our default levels
    elif m.set("model.n_levels", levels, f"{key}[].resp_levels", filled=not r.given(key)):
        note = "" if prompt == levels else f"; the prompt has n_levels levels too (was {prompt})"
        (m.translated if r.given(key) else m.filled).append(
            f"{key}[].resp_levels, prom_levels, models._prom_levels -> model.n_levels {levels}{note}")
    r.get("models._prom_levels")
    for e in entries if r.given(key) else []:  # the reference's default entries have nothing to report
        for k, v in e.items():
            where = f"{key}[{e.get('name', '?')}].{k}"
            if k in ("name", "arch_type", "size", "experts", "langs", "frozen_params", "resp_levels", "prom_levels"):
                continue
            if k == "interleave" and v:
                m.decide.append((where, "an interleaved AR is not implemented"))
            elif k == "training" and not v:
                m.decide.append((where, "an inference-only network: every network here trains "
                                        "(freeze one with model.frozen_params)"))
            elif k in _ENTRY_IGNORED:
                m.ignored.append((where, _ENTRY_IGNORED[k]))
            else:
                m.decide.append((where, "not a key of the reference's model entries"))


_SCHEDULERS = {"": "constant", "OneCycle": "onecycle", "WarmupLR": "constant", "WarmupDecayLR": "linear"}


def _schedule(m: Migration, r: _Reader) -> None:
    key, pkey = "hyperparameters.scheduler_type", "hyperparameters.scheduler_params"
    kind, params = r.get(key), r.get(pkey)
    params = params if isinstance(params, dict) else {}
    if kind and r.get("trainer.backend") != "deepspeed":
        m.set("hyperparameters.scheduler", "constant", key)
        m.translated.append(f"{key} {kind!r} -> hyperparameters.scheduler 'constant': the reference's local backend "
                            "ran no scheduler")
        for k in params:
            m.ignored.append((f"{pkey}.{k}", "no scheduler ran"))
        return
    if kind not in _SCHEDULERS:
        m.decide.append((key, f"{kind!r}: the schedules here are {', '.join(sorted(set(_SCHEDULERS.values())))} "
                              "and cosine (hyperparameters.scheduler)"))
        return
    if m.set("hyperparameters.scheduler", _SCHEDULERS[kind], key, filled=not r.given(key)):
        line = f"{key} {kind!r} -> hyperparameters.scheduler {_SCHEDULERS[kind]!r}"
        (m.translated if r.given(key) else m.filled).append(line + ("" if r.given(key) else " (ours: 'cosine')"))
    for k, v in params.items():
        if k == "warmup_num_steps" and kind.startswith("Warmup"):
            m.set("hyperparameters.warmup_steps", v, f"{pkey}.{k}")
            m.translated.append(f"{pkey}.{k} -> hyperparameters.warmup_steps {v}")
        else:
            m.ignored.append((f"{pkey}.{k}", "DeepSpeed's own scheduler parameter; ours are learning_rate, "
                                             "warmup_steps and min_lr_ratio"))
    if kind == "WarmupDecayLR":
        m.set("hyperparameters.min_lr_ratio", 0.0, key)
        m.translated.append(f"{key} 'WarmupDecayLR' -> hyperparameters.min_lr_ratio 0.0 (it decays to 0)")


def _optimizer(m: Migration, r: _Reader) -> None:
    key = "hyperparameters.optimizer"
    name = r.get(key)
    if not r.given(key):
        return
    ours = str(name).lower()
    if ours not in ("adamw", "sgd", "prodigy"):
        m.decide.append((key, f"{name!r}: the optimizers here are adamw, sgd, prodigy and adamw8bit"))
        return
    m.set(key, ours, key)
    m.copied.append(key) if ours == name else m.translated.append(f"{key} {name!r} -> {ours!r}")


def _trainer(m: Migration, r: _Reader) -> None:
    key = "trainer.load_tag"
    if r.given(key) and r.get(key) is not None:
        _copy(m, r, key, value=str(r.get(key)))
    elif r.given(key):
        m.ignored.append((key, "null: resume from `latest`, as trainer.load_tag '' does"))
    key = "trainer.load_module_only"
    if r.given(key) and r.get(key):
        m.set("trainer.load_states", False, key)
        m.translated.append(f"{key} true -> trainer.load_states false")
    elif r.given(key):
        m.ignored.append((key, "false: trainer.load_states says what a resume restores"))
    key = "trainer.deepspeed.zero_optimization_level"
    if r.given(key):
        _copy(m, r, key)
        if isinstance(r.get(key), int) and r.get(key) > 0:
            m.set("trainer.deepspeed.offload", True, key)
            m.translated.append(f"{key} > 0 -> trainer.deepspeed.offload true (the reference offloaded to the CPU "
                                "with any ZeRO stage)")


def _inference(m: Migration, r: _Reader) -> None:
    key = "inference.weight_dtype"
    if r.given(key) and r.get(key) == "int8":
        m.ignored.append((key, "'int8' meant 'do not cast' in the reference: float32 here (`--dtype int8` is "
                               "dynamic int8 quantization)"))
    else:
        _copy(m, r, key)


def _bitsandbytes(m: Migration, r: _Reader) -> None:
    keys = ("bitsandbytes.enabled", "bitsandbytes.linear", "bitsandbytes.bitnet")
    if not any(r.given(k) for k in keys):
        return
    enabled, linear, bitnet = (r.get(k) is True for k in keys)
    values = {"bitsandbytes.enabled": enabled, "bitsandbytes.linear": enabled and linear,
              "bitsandbytes.bitnet": enabled and linear and bitnet}
    for k in keys:
        if not r.given(k) and values[k] == OURS[k]:
            continue
        m.set(k, values[k], k)
        if values[k] == r.get(k):
            m.copied.append(k)
        else:
            m.translated.append(f"{k} {r.get(k)} -> {values[k]}: it acted only with bitsandbytes.enabled"
                                + (" and linear" if k.endswith("bitnet") else ""))


_GROUPS: list[tuple[tuple[str, ...], Callable[[Migration, _Reader], None]]] = [
    (("dataset.speaker_name_getter", "dataset.speaker_group_getter"), _speakers),
    (("dataset.validation",), _validation),
    (("models._models", "models._prom_levels"), _models),
    (("hyperparameters.scheduler_type", "hyperparameters.scheduler_params"), _schedule),
    (("hyperparameters.optimizer",), _optimizer),
    (("trainer.load_tag", "trainer.load_module_only", "trainer.deepspeed.zero_optimization_level"), _trainer),
    (("inference.weight_dtype",), _inference),
    (("bitsandbytes.enabled", "bitsandbytes.linear", "bitsandbytes.bitnet"), _bitsandbytes),
]
_DIRS = ("dataset.training", "dataset.validation", "dataset.noise")
HANDLED = {k for keys, _ in _GROUPS for k in keys} | set(_DIRS) | set(IGNORED)


def migrate(tree: dict[str, Any], source: str | Path | None = None) -> Migration:
    """Our config tree for the reference-layout `tree` (read from `source`, whose folder relative
    dataset paths are rewritten against), and what became of every key."""
    r = _Reader(tree, Path(source) if source is not None else None)
    m = Migration()
    for key, value in r.file.items():  # keys of ours (a file may mix them in) come first
        if key in OURS and key not in REFERENCE_DEFAULTS:
            m.set(key, value, key)
            m.kept.append(key)
    for key in _DIRS:
        _dataset_dirs(m, r, key)
    for _, translate in _GROUPS:
        translate(m, r)
    for key, value in r.file.items():
        if key in IGNORED:
            m.ignored.append((key, IGNORED[key]))
        elif key.startswith("models.") and key not in REFERENCE_DEFAULTS:
            m.decide.append((key, "not a key of the reference's models section"))
        elif key in OURS or key in HANDLED:
            continue
        elif key.split(".")[0] in ("model", "codec"):  # sections only we have
            m.decide.append((key, "not a key of ours (python -m vall_e.config help=true lists them)"))
        else:
            m.decide.append((key, f"neither a key of the reference's layout ({REFERENCE}) nor of ours"))
    for key in REFERENCE_DEFAULTS:  # the rest: same key, same meaning (or the reference's default)
        if key in OURS and key not in HANDLED:
            _copy(m, r, key)
    m.tree = _ordered(m.tree)
    return m
