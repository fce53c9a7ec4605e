"""Bad input and the files it comes in: one exception type, one way to read a file, one way to write one.

Every file the tool reads (config.json, profiles, result records, baselines, calibration files, sweep YAML) goes
through `read_text`: it refuses what is not a regular file before opening it for real (a FIFO would block
forever), decodes strict UTF-8 (a UTF-8 BOM is tolerated: Windows editors write one), and turns every OS error
into an InputError naming the file. `read_json` adds JSON's own rules: no NaN / Infinity (not JSON, and they
would flow into `--json` output), no integers longer than Python's conversion limit, no nesting deeper than the
parser's recursion limit. Every file the tool writes goes through `write_text`, which names an unwritable
destination instead of raising OSError.
"""

from __future__ import annotations

import difflib
import os
import reprlib
import stat
import sys
from pathlib import Path

# Largest input file read whole. The biggest legitimate inputs are result files (about 4 KB per record), so
# this allows ~50,000 records per file while keeping a mistaken multi-GB file from exhausting memory.
MAX_INPUT_BYTES = 200 * 1024**2


class InputError(ValueError):
    """Bad user input (unknown name, malformed file, impossible value). The message is one line."""


def warn(message: str) -> None:
    """A one-line warning on stderr: something was skipped or assumed, the command goes on."""
    print(f"qlora-bench: warning: {message}", file=sys.stderr)


def closest(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """The candidates that look most like `name` (difflib ratio, then substring matches)."""
    key = name.lower()
    found = difflib.get_close_matches(key, candidates, n=n, cutoff=0.4)
    for c in candidates:
        if len(found) >= n:
            break
        if key and key in c and c not in found:
            found.append(c)
    return found


def _bounded_repr() -> reprlib.Repr:
    """repr that stops early: a YAML alias bomb (a 500-byte file whose lists reference each other 10 levels deep)
    expands to billions of items under the built-in repr."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 60, 60
    r.maxlong = 40
    return r


_REPR = _bounded_repr()


def shown(value: object, limit: int = 60) -> str:
    """A value as an error message shows it, in JSON's words where they differ (true, null), shortened: a
    5,000-digit number or a huge structure must not flood the line (nor take minutes to print)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int) and abs(value) >= 10**limit:
        digits = int(abs(value).bit_length() * 0.30103) + 1  # log10(2): str() refuses beyond 4,300 digits
        return f"a {digits:,}-digit integer"
    text = _REPR.repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def file_kind(path: Path) -> str | None:
    """None for a readable regular file (following links), else what it is instead, in words."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a broken link" if os.path.islink(path) else "missing"
    except OSError as e:  # a link loop, a name too long, a component that is not a folder
        return f"unreadable ({_os_reason(e)})"
    except ValueError:  # a NUL byte: no file can have that name
        return "unusable (a NUL character in the name)"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a regular UTF-8 file, or an InputError naming the file and what is wrong with it."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "missing":
        raise InputError(f"{path}: no such {what}")
    if kind:
        raise InputError(f"{path}: expected a {what}, found {kind}")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the check, opening it must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError(f"{path}: expected a {what}, found something that is not a regular file")
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({_os_reason(e)})") from None
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{path}: larger than {MAX_INPUT_BYTES // 1024**2} MiB; is this the right {what}?")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{path}: UTF-16 text; save the {what} as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); expected a UTF-8 {what}"
        ) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999 parses to infinity
        raise ValueError(f"{text[:20]} is beyond the range of a number")
    return value


def parse_json(text: str, where: str) -> object:
    """One JSON document; an InputError naming `where` and the problem otherwise."""
    import json

    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: not usable JSON (nested too deeply)") from None
    except ValueError as e:  # NaN/Infinity, or an integer beyond Python's digit limit
        reason = str(e).splitlines()[0]
        if "digits" in reason:
            reason = "an integer with too many digits"
        raise InputError(f"{where}: not usable JSON ({reason})") from None


def parse_yaml(text: str, where: str) -> object:
    """One YAML document (PyYAML's safe loader); an InputError naming `where` and the problem otherwise."""
    try:
        import yaml
    except ImportError:
        raise InputError(f"{where}: reading YAML needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{where}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise InputError(f"{where}: not usable YAML (nested too deeply)") from None


def read_json(path: str | Path, what: str = "JSON file") -> object:
    """A JSON file's content, or an InputError naming the file and where it is malformed."""
    return parse_json(read_text(path, what), str(path))


def read_json_object(path: str | Path, what: str = "JSON file") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object {{...}} ({what}), found {type_name(data)}")
    return data


def type_name(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """A path the tool may write a file to: not a folder or a FIFO, in a folder that exists or can be made."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "a folder":
        raise InputError(f"{path}: is a folder; give a file name for the {what}")
    if kind and kind.startswith("not a regular"):
        raise InputError(f"{path}: cannot write the {what} there ({kind})")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{path}: cannot create the folder {parent} for the {what} ({_os_reason(e)})") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: the folder {parent} is not writable; choose another place for the {what}")
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    path = Path(path)
    kind = file_kind(path)
    if kind not in ("a folder", "missing"):
        raise InputError(f"{path}: cannot use it as the {what} ({'a file' if kind is None else kind})")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{path}: cannot create the {what} ({_os_reason(e)})") from None
    if not os.access(path, os.W_OK):
        raise InputError(f"{path}: the {what} is not writable; choose another place")
    return path


def write_text(path: str | Path, text: str, what: str = "output file") -> Path:
    """Write a whole file atomically (a temporary beside it, then rename): a reader never sees half of it."""
    path = check_output_file(path, what)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write the {what} ({_os_reason(e)})") from None
    return path
