"""The one validating loader (qlora_bench.schema) and the one file reader (qlora_bench.errors): exact messages
for each kind of wrong value, and files that are not what they claim to be."""

import os
from dataclasses import dataclass
from typing import Literal

import pytest

from qlora_bench.errors import InputError, read_json, read_json_object, write_text
from qlora_bench.schema import Extra, load, rule


@dataclass(frozen=True)
class Inner:
    bytes: int = rule(ge=0, le=100)


@dataclass(frozen=True)
class Outer:
    kind: Literal["a", "b"]
    version: Literal[1]
    size: int = rule(1, ge=1, le=10, hint="a size")
    rate: float | None = rule(None, gt=0)
    name: str = rule("x", nonempty=True)
    inner: Inner | None = None
    items: list[float] = rule(factory=list, ge=0)
    table: dict[str, int] = rule(factory=dict, ge=0)

    def check(self, where):
        if self.kind == "b" and self.size > 5:
            raise InputError(f"{where}: kind b holds at most 5")


@dataclass(frozen=True)
class Open:
    extra = Extra.ALLOW
    n: int = 0


def _err(data, cls=Outer):
    with pytest.raises(InputError) as e:
        load(cls, data, "f.json")
    return str(e.value)


def test_valid_object_loads_with_nested_dataclasses():
    o = load(Outer, {"kind": "a", "version": 1, "inner": {"bytes": 3}, "items": [1, 2.5], "table": {"x": 1}}, "f")
    assert o.inner == Inner(3) and o.items == [1, 2.5] and o.size == 1


@pytest.mark.parametrize("data,message", [
    ({"version": 1}, "f.json: missing field 'kind' (one of a, b)"),
    ({"kind": "c", "version": 1}, "f.json: field 'kind' is 'c'; expected one of a, b"),
    ({"kind": "a", "version": True}, "f.json: field 'version' is true; expected 1"),
    ({"kind": "a", "version": 99}, "f.json: field 'version' is 99; expected 1"),
    ({"kind": "a", "version": 1, "size": "4"}, "f.json: field 'size' is '4'; expected an integer in [1, 10] (a size)"),
    ({"kind": "a", "version": 1, "size": 4.0}, "f.json: field 'size' is 4.0; expected an integer in [1, 10] (a size)"),
    ({"kind": "a", "version": 1, "size": True}, "f.json: field 'size' is true; expected an integer in [1, 10]"),
    ({"kind": "a", "version": 1, "size": 10**400}, "field 'size' is a 401-digit integer"),
    ({"kind": "a", "version": 1, "rate": float("nan")}, "field 'rate' is nan; expected a number > 0 or null"),
    ({"kind": "a", "version": 1, "rate": 0}, "field 'rate' is 0; expected a number > 0 or null"),
    ({"kind": "a", "version": 1, "name": " "}, "field 'name' is ' '; expected a non-empty string"),
    ({"kind": "a", "version": 1, "inner": {"bytes": -1}}, "field 'inner.bytes' is -1; expected an integer in [0, 100]"),
    ({"kind": "a", "version": 1, "inner": [1]}, "field 'inner' is [1]; expected an object or null"),
    ({"kind": "a", "version": 1, "items": [1, -2]}, "field 'items[1]' is -2; expected a number >= 0"),
    ({"kind": "a", "version": 1, "table": {"x": "y"}}, "field 'table.x' is 'y'; expected an integer >= 0"),
    ({"kind": "a", "version": 1, "typo": 1}, "f.json: unknown field 'typo'; known: inner, items, kind"),
    ({"kind": "b", "version": 1, "size": 6}, "f.json: kind b holds at most 5"),
    ([1, 2], "f.json: the content is a list; expected an object {...} with fields kind, version"),
])
def test_messages_name_the_field_the_value_and_what_is_right(data, message):
    assert message in _err(data)


def test_extra_fields_are_kept_quiet_where_allowed():
    assert load(Open, {"n": 1, "later": "x"}, "f").n == 1


def test_read_json_refuses_what_json_does_not_allow(tmp_path):
    f = tmp_path / "a.json"
    for text, needle in (("{\"a\": NaN}", "NaN is not a JSON number"), ("{\"a\": Infinity}", "Infinity"),
                         ("{\"a\": 1e999}", "beyond the range"), ("{\"a\": 1" + "0" * 5000 + "}", "too many digits"),
                         ("[" * 50_000 + "]" * 50_000, "nested too deeply"), ("{", "not valid JSON")):
        f.write_text(text)
        with pytest.raises(InputError, match=needle):
            read_json(f)
    f.write_text("[]")
    with pytest.raises(InputError, match="expected a JSON object"):
        read_json_object(f)
    f.write_bytes(b"\xef\xbb\xbf{\"a\": 1}")  # a UTF-8 byte-order mark, as Windows editors write
    assert read_json(f) == {"a": 1}


def test_reader_refuses_non_files_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "none")
    for name, needle in (("fifo", "not a regular file"), ("dir", "a folder"), ("loop", "unreadable"),
                         ("dangling", "broken link"), ("missing", "no such")):
        with pytest.raises(InputError, match=needle):
            read_json(tmp_path / name)


def test_write_text_names_an_unusable_destination(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        write_text(tmp_path / "dir", "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot create the folder"):
        write_text(tmp_path / "file" / "out.json", "x")
    assert write_text(tmp_path / "new" / "out.json", "x").read_text() == "x"
