"""Config schemas of the jobs and the Serve app: typed sections, one error listing every mistake, `--help`.

A schema is a tree of pydantic models (`Section`: unknown keys are errors, `check()` holds the rules that span
several keys), plain dataclasses (`pipeline.decoding.settings`), lists and maps of them, and model stages whose
keys depend on their engine (`by_engine`: a discriminated union on the `engine` key). `validate(schema, tree)`:

1. walks the raw tree against the schema and explains every key that is not there, one mechanism for all keys:
   a field's former name (`formerly=`) or a key that moved into a subsection ("this key was renamed; use ..."),
   a key that another engine of the same stage takes ("engine vllm does not use this key; engine fast takes
   it"), otherwise the closest valid keys;
2. validates types and ranges with pydantic (messages keyed by the config path, engine tags left out);
3. runs every section's `check()`;

and raises one `ConfigError` with every problem. `describe(schema)` is `--help`: every key, its default, the
engines that take it and its description. `load_config` adds the YAML file and `key=value` overrides.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError
from pydantic_core import PydanticUndefined


class ConfigError(ValueError):
    """Everything wrong with a config, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


class Section(BaseModel):
    """A config section: unknown keys are errors; `check()` returns the problems that span several keys (key
    names relative to the section; `validate` prefixes them). Sections built from several parts chain their
    `check()` with `super().check()`."""

    model_config = ConfigDict(extra="forbid")

    def check(self) -> list[str]:
        return []


def formerly(*names: str) -> dict:
    """`Field(..., json_schema_extra=formerly("kind"))`: the key's old names, which the key check points here."""
    return {"formerly": list(names)}


# ---- model stages: one section per engine -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Engines:
    """The metadata of a `by_engine` field: engine name -> its section, and the engine when none is given."""

    variants: dict[str, type]
    default: str


def by_engine(*variants: type[BaseModel], default: str):
    """The type of a model-stage field: one section per engine, picked by the stage's `engine` key (`default`
    when it is not set). Each variant declares `engine: Literal["<name>"] = "<name>"`."""
    tags = {v.model_fields["engine"].default: v for v in variants}
    assert default in tags, (default, list(tags))

    def pick(value):
        return value.get("engine", default) if isinstance(value, dict) else getattr(value, "engine", default)

    union = Union[tuple(Annotated[v, Tag(t)] for t, v in tags.items())]  # noqa: UP007 (a runtime union)
    return Annotated[union, Discriminator(pick), Engines(tags, default)]


def engines_of(tp) -> Engines | None:
    return next((m for m in get_args(tp)[1:] if isinstance(m, Engines)), None) if get_origin(tp) is Annotated else None


def _unwrap(tp) -> tuple[str, Any]:
    """What a field's type is, for walking a config tree: ("engines", Engines) | ("model", cls) |
    ("dataclass", cls) | ("list", item type) | ("dict", value type) | ("leaf", None)."""
    eng = engines_of(tp)
    if eng is not None:
        return "engines", eng
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        for a in get_args(tp):
            kind = _unwrap(a)
            if kind[0] != "leaf":
                return kind
        return "leaf", None
    if origin in (list, tuple):
        return "list", get_args(tp)[0]
    if origin is dict:
        return "dict", get_args(tp)[1]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "model", tp
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "dataclass", tp
    return "leaf", None


def _fields(cls) -> dict[str, tuple[Any, Any, str]]:
    """name -> (type, default, description) of a section or a settings dataclass."""
    if issubclass(cls, BaseModel):
        return {n: (f.annotation if not f.metadata else Annotated[(f.annotation, *f.metadata)],
                    f.get_default(call_default_factory=True), f.description or "")
                for n, f in cls.model_fields.items()}
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = (f.type if not isinstance(f.type, str) else cls.__annotations__.get(f.name, f.type), default,
                       f.metadata.get("description", ""))
    return out


def _former_names(cls) -> dict[str, str]:
    if not issubclass(cls, BaseModel):
        return {}
    return {old: name for name, f in cls.model_fields.items()
            for old in ((f.json_schema_extra or {}).get("formerly", []) if isinstance(f.json_schema_extra, dict) else [])}


def _paths(tp, prefix: str = "") -> list[str]:
    """Every key under a type, dotted (a stage's keys: those of its default engine)."""
    kind, x = _unwrap(tp)
    if kind == "engines":
        return _paths(x.variants[x.default], prefix)
    if kind in ("model", "dataclass"):
        out = []
        for name, (t, _, _) in _fields(x).items():
            sub = _paths(t, f"{prefix}{name}.")
            out += sub or [f"{prefix}{name}"]
        return out
    return []


# ---- 1. keys ---------------------------------------------------------------------------------------------
def key_problems(tp, tree, prefix: str = "", alts: dict[str, Any] | None = None, tag: str | None = None,
                 found: list[tuple] | None = None, at: tuple = ()) -> list[str]:
    """Every key of `tree` that `tp` does not have, explained. `alts`: inside a model stage, the other engines'
    types at the same place (engine -> type), `tag` the stage's engine. `found` collects each such key's path
    in the tree (for `without`)."""
    kind, x = _unwrap(tp)
    if kind == "engines":
        if not isinstance(tree, dict):
            return []
        chosen = tree.get("engine", x.default)
        if chosen not in x.variants:
            return [f"{prefix}engine: must be one of {', '.join(x.variants)} (got {chosen!r})"]
        others = {t: v for t, v in x.variants.items() if t != chosen}
        return key_problems(x.variants[chosen], tree, prefix, others, chosen, found, at)
    if kind in ("model", "dataclass") and isinstance(tree, dict):
        fields, out = _fields(x), []
        alt_fields = {t: _fields(_unwrap(a)[1]) for t, a in (alts or {}).items()
                      if _unwrap(a)[0] in ("model", "dataclass")}
        for key, value in tree.items():
            key = str(key)
            if key in fields:
                sub_alts = {t: fs[key][0] for t, fs in alt_fields.items() if key in fs}
                out += key_problems(fields[key][0], value, f"{prefix}{key}.", sub_alts, tag, found, at + (key,))
            else:
                out.append(f"{prefix}{key}: {_unknown(x, key, prefix, alt_fields, alts or {}, tag)}")
                if found is not None:
                    found.append(at + (key,))
        return out
    if kind == "list" and isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in key_problems(x, v, f"{prefix}{i}.", found=found, at=at + (i,))]
    if kind == "dict" and isinstance(tree, dict):
        return [p for k, v in tree.items() for p in key_problems(x, v, f"{prefix}{k}.", found=found, at=at + (k,))]
    return []


def without(tree, paths: list[tuple]):
    """A copy of a config tree without the keys at `paths` (so that what is left is still checked)."""
    import copy

    out = copy.deepcopy(tree)
    for path in paths:
        node = out
        for step in path[:-1]:
            node = node[step]
        node.pop(path[-1], None)
    return out


def _unknown(cls, key: str, prefix: str, alt_fields: dict, alts: dict, tag: str | None) -> str:
    """Why `key` is not a key of section `cls` (at `prefix`), and what the user probably meant."""
    old = _former_names(cls)
    if key in old:
        return f"this key was renamed; use {prefix}{old[key]}"
    moved = [p for p in _paths(cls) if p.rsplit(".", 1)[-1] == key]
    if moved:
        return f"this key was renamed; use {' or '.join(prefix + p for p in moved)}"
    takers = [t for t, fs in alt_fields.items() if key in fs]
    if takers:
        return f"engine {tag} does not use this key; {_engines(takers)} take{'s' if len(takers) == 1 else ''} it"
    elsewhere: dict[str, list[str]] = {}
    for t, a in alts.items():
        for p in _paths(a):
            if p.rsplit(".", 1)[-1] == key:
                elsewhere.setdefault(prefix + p, []).append(t)
    if elsewhere:
        return "this key was renamed; use " + " or ".join(f"{p} ({_engines(ts)} only; this stage's engine is {tag})"
                                                          for p, ts in elsewhere.items())
    valid = _paths(cls)
    leaves = {p.rsplit(".", 1)[-1]: p for p in valid}
    close = difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.6)
    close = [leaves[c] for c in close] + [p for p in difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
                                          if p not in {leaves[c] for c in close}]
    if close:
        return "unknown key; closest valid keys: " + ", ".join(prefix + c for c in close[:3])
    return "unknown key" + (f" (valid here: {', '.join(sorted({p.split('.')[0] for p in valid}))})" if valid else "")


def _engines(tags: list[str]) -> str:
    return ("engine " if len(tags) == 1 else "engines ") + ", ".join(tags)


# ---- 2. types and ranges -----------------------------------------------------------------------------------
def _path(schema, loc: tuple) -> str:
    """A pydantic error location as a config key: the engine tags pydantic puts into it are left out."""
    parts, tp = [], schema
    for i, item in enumerate(loc):
        kind, x = _unwrap(tp)
        if kind == "engines":
            if item in x.variants:
                tp = x.variants[item]
                continue
            kind, x = "leaf", None
        parts.append(str(item))
        if kind in ("model", "dataclass"):
            tp = _fields(x).get(str(item), (None,))[0]
        elif kind in ("list", "dict"):
            tp = x
        else:
            parts += [str(r) for r in loc[i + 1:]]
            break
    return ".".join(parts) or "(top level)"


def type_problems(schema, e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument", "union_tag_invalid"):
            continue  # explained by key_problems
        key = _path(schema, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] in ("missing", "value_error", "assertion_error") else f" (got {err.get('input')!r})"
        out += [f"{key}: {line}{got}" if key != "(top level)" else f"{line}{got}" for line in msg.splitlines()]
    return out


# ---- 3. cross-key rules ------------------------------------------------------------------------------------
def section_problems(node, prefix: str = "") -> list[str]:
    """Every section's `check()` problems, depth first, with full key names."""
    out = []
    if isinstance(node, BaseModel):
        if isinstance(node, Section):
            out += [f"{prefix}{p}" for p in node.check()]
        for name in type(node).model_fields:
            out += section_problems(getattr(node, name), f"{prefix}{name}.")
    elif isinstance(node, (list, tuple)):
        for i, x in enumerate(node):
            out += section_problems(x, f"{prefix}{i}.")
    elif isinstance(node, dict):
        for k, x in node.items():
            out += section_problems(x, f"{prefix}{k}.")
    elif dataclasses.is_dataclass(node) and hasattr(node, "problems"):
        out += [f"{prefix.rstrip('.')}: {p}" for p in node.problems()]
    return out


def validate(schema: type[BaseModel], tree: dict, where: str = "") -> BaseModel:
    """The typed config of `tree`, or a ConfigError listing every problem (`where`: e.g. the file, for the last
    line of the error)."""
    unknown: list[tuple] = []
    problems = key_problems(schema, tree, found=unknown)
    try:  # the rest is checked as if the keys explained above were not there: every problem in one error
        cfg = schema.model_validate(without(tree, unknown), context={"config_validate": True})
    except ValidationError as e:
        order = list(schema.model_fields)  # problems in the schema's order of sections, then unknown sections
        problems = sorted(problems + type_problems(schema, e), key=lambda p: order.index(p.split(".")[0].split(":")[0])
                          if p.split(".")[0].split(":")[0] in order else len(order))
        raise ConfigError(problems + ([where] if where else [])) from None
    keys = bool(problems)
    problems += section_problems(cfg)
    if problems:
        raise ConfigError(problems + ([where] if where and keys else []))
    return cfg


# ---- loading and --help ------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


def expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def load_config(schema: type[BaseModel], default_yaml: str | Path | None, argv: list[str] | None = None):
    """The typed config of a command: `schema` <- YAML (`default_yaml`, or `config=...` in argv; None: no file,
    e.g. a benchmark's options) <- `key=value` arguments. `--help` prints every key and exits. Raises
    ConfigError listing every problem."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(describe(schema))
        sys.exit(0)
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        raise ConfigError([f"arguments must be key=value overrides (or --help), got {a!r}" for a in bad])
    path, rest = (Path(default_yaml) if default_yaml is not None else None), []
    for a in argv:
        k, v = a.split("=", 1)
        if k == "config":
            path = Path(v)
        else:
            rest.append(a)
    if path is not None and not path.is_absolute() and not path.exists():
        path = REPO / path
    if path is not None and not path.exists():
        raise ConfigError([f"config file not found: {path}"])
    try:
        base = OmegaConf.load(path) if path is not None else OmegaConf.create({})
        args = OmegaConf.from_dotlist(rest)
        base = OmegaConf.create(_for_engines(schema, OmegaConf.to_container(base), OmegaConf.to_container(args)))
        tree = OmegaConf.to_container(OmegaConf.merge(base, args), resolve=True) or {}
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError([f"{str(e).splitlines()[0]}" + (f"  (config file {path})" if path else "")]) from None
    return validate(schema, tree, f"(config file {path})" if path else "")


def _for_engines(schema: type[BaseModel], file: dict, args: dict) -> dict:
    """The config file's tree without its keys for a model stage whose engine the arguments switch, where the new
    engine does not take them (the file wrote them for its own engine: `aligner.engine=none` on a file that sets
    `aligner.model`); the keys the arguments give are always checked."""
    file = dict(file)
    for name, field in schema.model_fields.items():
        eng = engines_of(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
        engine = (args.get(name) or {}).get("engine") if isinstance(args.get(name), dict) else None
        if eng is None or engine not in eng.variants or not isinstance(file.get(name), dict):
            continue
        takes = eng.variants[engine].model_fields
        file[name] = {k: v for k, v in file[name].items() if k in takes}
    return file


def to_yaml(cfg: BaseModel) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump(mode="json")))


def _leaves(tp, prefix: str) -> list[tuple[str, Any, str, tuple[str, ...] | None]]:
    """(key, default, description, engines that take it or None = all) for every key under `tp`."""
    kind, x = _unwrap(tp)
    if kind == "engines":
        merged: dict[str, dict] = {}  # key -> {"default", "descs": {description: [engines]}, "engines"}
        for t, v in x.variants.items():
            for key, default, desc, _ in _leaves(v, prefix):
                m = merged.setdefault(key, {"default": default, "descs": {}, "engines": []})
                if t == x.default:
                    m["default"] = default
                m["engines"].append(t)
                if desc:
                    m["descs"].setdefault(desc, []).append(t)
        out = [(f"{prefix}engine", x.default, f"{' | '.join(x.variants)}: " +
                next(iter(merged.pop(f"{prefix}engine")["descs"]), ""), None)]
        for key, m in merged.items():
            descs = m["descs"]
            desc = next(iter(descs), "") if len(descs) <= 1 else " | ".join(
                f"{', '.join(ts)}: {d}" for d, ts in descs.items())
            out.append((key, m["default"], desc, None if len(m["engines"]) == len(x.variants) else tuple(m["engines"])))
        first = [f"{prefix}{k}" for k in FIRST_KEYS]  # what a model stage is before how it runs
        return sorted(out, key=lambda leaf: first.index(leaf[0]) if leaf[0] in first else len(first))
    if kind in ("model", "dataclass"):
        out = []
        for name, (t, default, desc) in _fields(x).items():
            sub_kind, sub = _unwrap(t)
            if sub_kind in ("model", "dataclass", "engines"):
                out += _leaves(t, f"{prefix}{name}.")
            elif sub_kind in ("list", "dict") and _unwrap(sub)[0] != "leaf":
                what, key = ("list", "N") if sub_kind == "list" else ("map", "<name>")
                out.append((f"{prefix}{name}", default, f"a {what} of entries:" + (f" {desc}" if desc else ""), None))
                out += _leaves(sub, f"{prefix}{name}.{key}.")
            else:
                out.append((f"{prefix}{name}", default, desc, None))
        return out
    return []


FIRST_KEYS = ("engine", "model", "dtype", "device", "trust_remote_code")


def describe(schema, prefix: str = "") -> str:
    """Every key of a schema with its default, the engines that take it (when not all of its stage's engines
    do) and its description, one per line (`--help`)."""
    lines = []
    for key, default, desc, engines in _leaves(schema, prefix):
        note = " ".join(x for x in ((f"[{', '.join(engines)}]" if engines else ""), desc) if x)
        shown = "(required)" if default is PydanticUndefined else repr(default)
        lines.append(f"{key} = {shown}" + (f"    # {note}" if note else ""))
    return "\n".join(lines)
