"""Typed schemas for every input kind, and the one loader that checks data against them.

Each kind of input (config.json fields, profiles, Settings, result records, baselines, calibration files, sweep
files) is a frozen dataclass: a field's annotation is its type, `rule(...)` in its metadata its range, and an
optional `check(self, where)` method its cross-field rules. `load(cls, data, where)` checks a JSON/YAML value
against the class and returns an instance, or raises one InputError naming the file, the field (dotted path),
what it holds and what would be right:

    results/h100/a.jsonl:3: field 'measured.tokens_per_sec' is 'fast'; expected a number > 0

Why a loader of our own and not a validation library: the planning path (profiles, settings, estimate, plan) is
the base install and runs in the browser under Pyodide, offline, so it must stay pure Python. pydantic (via
pydantic-core) and msgspec are compiled; jsonschema needs rpds-py (Rust); cattrs is pure Python but coerces
("4" -> 4, true -> 1) and has no ranges. Dataclass annotations plus this one function give every input kind the
same strict checks (JSON types as transformers' strict configs check them: no bool for an int, no string for a
number, no NaN) and the same messages.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass
from functools import cache
from typing import Any, Literal, Union

from .errors import InputError, shown, type_name


@dataclass(frozen=True)
class Rule:
    """Range of a number (or of each number in a list / dict), choices, a pattern or a length for a string."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None  # a string must match it whole
    max_len: int = 10_000  # strings: a name, an id, an error message; never a whole file
    nonempty: bool = False  # strings, lists and objects
    hint: str = ""  # appended to the expectation: what the value means / what would be right

    def describe_number(self) -> str:
        parts = []
        if self.ge is not None and self.le is not None:
            return f"in [{_num(self.ge)}, {_num(self.le)}]"
        if self.ge is not None and self.lt is not None:
            return f"in [{_num(self.ge)}, {_num(self.lt)})"
        if self.gt is not None and self.le is not None:
            return f"in ({_num(self.gt)}, {_num(self.le)}]"
        for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)):
            if v is not None:
                parts.append(f"{op} {_num(v)}")
        return " and ".join(parts)

    def number_ok(self, v: float) -> bool:
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )


NO_RULE = Rule()


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        v = int(v)
        return f"2^{v.bit_length() - 1}" if v >= 1 << 20 and v & (v - 1) == 0 else f"{v:,}"
    return f"{v:g}"


def rule(default: Any = MISSING, *, factory: Any = MISSING, **kw) -> Any:
    """A dataclass field with a Rule: `batch: int = rule(1, ge=1, le=2**20)`."""
    md = {"rule": Rule(**kw)}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


class Extra:
    """Class attribute `extra = Extra.ALLOW` keeps the loader quiet about keys the schema does not name (records
    carry fields for people and for later versions); the default refuses them (a typo in a sweep file or a
    settings key must not be ignored)."""

    FORBID = "forbid"
    ALLOW = "allow"


FLAGS = "command line"  # `where` for values that came from flags: messages name --the-flag, not a field


def fail(where: str, path: str, value: Any, expected: str) -> typing.NoReturn:
    if where == FLAGS:
        raise InputError(f"--{path.replace('_', '-')} {shown(value)}: expected {expected}")
    field_part = f"field '{path}' is {shown(value)}" if path else f"the value is {shown(value)}"
    raise InputError(f"{where}: {field_part}; expected {expected}")


# ---- checking one value against a type ---------------------------------------------------------------------
def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def describe(tp, r: Rule = NO_RULE) -> str:
    """What a value of this type and rule is, in words (for messages)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    hint = f" ({r.hint})" if r.hint else ""
    if _is_union(tp):
        inner = [a for a in args if a is not type(None)]
        null = " or null" if type(None) in args else ""
        if r.pattern and r.hint:  # a patterned string is described by its hint alone
            return r.hint + null
        text = " or ".join(describe(a, r).removesuffix(hint) for a in inner)
        return text + null + hint
    if origin is Literal:
        choices = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
        return (f"one of {choices}" if len(args) > 1 else f"{choices}") + hint
    if tp is bool:
        return "true or false" + hint
    if tp is int or tp is float:
        word = "an integer" if tp is int else "a number"
        rng = r.describe_number()
        return f"{word} {rng}".strip() + hint
    if tp is str:
        if r.pattern:  # a regular expression helps nobody: say what the string names
            return r.hint or f"a string matching {r.pattern}"
        return ("a non-empty string" if r.nonempty else "a string") + hint
    if origin in (list, tuple):
        return f"a list of {_plural(describe(args[0], r))}" + hint
    if origin is dict:
        return f"an object of {_plural(describe(args[1], r))}" + hint
    if dataclasses.is_dataclass(tp) or tp is dict:
        return ("a non-empty object" if r.nonempty else "an object") + hint
    if tp is list:
        return "a list" + hint
    return "a JSON value" + hint


def _plural(text: str) -> str:
    words = (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"), ("an object", "objects"))
    for a, b in words:
        if text.startswith(a):
            return b + text[len(a) :]
    return text


def check_value(tp, value: Any, where: str, path: str, r: Rule = NO_RULE) -> Any:
    """`value` if it is a `tp` within `r` (a nested dataclass comes back as an instance); else InputError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            if _matches_shape(a, value):
                if a in (int, float, str, bool):  # a scalar's message names the whole union ("... or null")
                    try:
                        return check_value(a, value, where, path, r)
                    except InputError:
                        fail(where, path, value, describe(tp, r))
                return check_value(a, value, where, path, r)  # a container's names the element at fault
        fail(where, path, value, describe(tp, r))
    if origin is Literal:
        # exact type too: True == 1 in Python, but `schema: true` is not schema 1
        if any(value == a and type(value) is type(a) for a in args):
            return value
        fail(where, path, value, describe(tp, r))
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail(where, path, value, describe(tp, r))
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool) or not r.number_ok(value):
            fail(where, path, value, describe(tp, r))
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not r.number_ok(value):
            fail(where, path, value, describe(tp, r))
        return value
    if tp is str:
        if (
            not isinstance(value, str)
            or len(value) > r.max_len
            or (r.nonempty and not value.strip())
            or (r.pattern and not re.fullmatch(r.pattern, value))
        ):
            fail(where, path, value, describe(tp, r))
        return value
    if tp in (dict, list):  # any JSON object / list: its content is someone else's schema
        if not isinstance(value, tp) or (r.nonempty and not value):
            fail(where, path, value, describe(tp, r))
        return value
    if origin in (list, tuple):
        if not isinstance(value, list) or (r.nonempty and not value):
            fail(where, path, value, describe(tp, r))
        item = args[0]
        out = [check_value(item, v, where, f"{path}[{i}]", r) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict) or (r.nonempty and not value):
            fail(where, path, value, describe(tp, r))
        return {k: check_value(args[1], v, where, f"{path}.{k}", r) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(where, path, value, describe(tp, r))
        return load(tp, value, where, prefix=path)
    raise TypeError(f"schema type {tp!r} is not supported")  # a bug in a schema, not bad input


def _matches_shape(tp, value) -> bool:
    """Whether `value` is the JSON kind of `tp` (picks the branch of a union whose message applies)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, list)
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if tp is list:
        return isinstance(value, list)
    return True


# ---- loading an object into a dataclass ---------------------------------------------------------------------
@cache
def _fields(cls) -> tuple[tuple[str, Any, Rule, bool], ...]:
    """(name, type, rule, required) per field of a schema dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        out.append((f.name, hints[f.name], f.metadata.get("rule", NO_RULE), required))
    return tuple(out)


def load(cls, data: Any, where: str, prefix: str = ""):
    """An instance of the schema dataclass `cls` from a JSON/YAML object, checked field by field."""
    if not isinstance(data, dict):
        what = f"field '{prefix}'" if prefix else "the content"
        raise InputError(f"{where}: {what} is {type_name(data)}; expected an object {{...}} with {_names(cls)}")
    known = {name for name, *_ in _fields(cls)}
    if getattr(cls, "extra", Extra.FORBID) == Extra.FORBID:
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            at = f" in '{prefix}'" if prefix else ""
            raise InputError(
                f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown[:5])}"
                f"{at}; known: {', '.join(sorted(known))}"
            )
    kwargs = {}
    for name, tp, r, required in _fields(cls):
        path = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if required:
                raise InputError(f"{where}: missing field '{path}' ({describe(tp, r)})")
            continue
        kwargs[name] = check_value(tp, data[name], where, path, r)
    obj = cls(**kwargs)
    if hasattr(obj, "check"):  # cross-field rules; a nested object's messages name it
        obj.check(f"{where}: field '{prefix}'" if prefix else where)
    return obj


def check_fields(obj, where: str) -> None:
    """The per-field rules applied to an instance built in code (e.g. Settings from command-line flags)."""
    for name, tp, r, _ in _fields(type(obj)):
        check_value(tp, getattr(obj, name), where, name, r)


def _names(cls) -> str:
    required = [name for name, _, _, req in _fields(cls) if req]
    return "fields " + ", ".join(required) if required else "its fields"


def field_rule(cls, name: str) -> Rule:
    """The Rule of one field (command-line parsers share the bounds of the schema)."""
    for n, _, r, _ in _fields(cls):
        if n == name:
            return r
    raise KeyError(name)
