"""One exception type for bad input: the CLI prints its message as one line and exits 2."""

from __future__ import annotations

import difflib


class InputError(ValueError):
    """Bad user input (unknown name, malformed file, impossible value). The message is one line."""


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


def read_json(path) -> object:
    """A JSON file's content, or an InputError naming the file and where it is malformed."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
