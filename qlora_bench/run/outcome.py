"""A failed record, shown: its outcome and message on one line (rich markup, the message escaped: errors hold
[shapes] and paths that rich would read as markup) and where it was raised. Pure Python (render uses it)."""

from __future__ import annotations

import re
from pathlib import PurePath

from rich.markup import escape

STYLE = {"ok": "bold green", "oom": "bold red", "error": "bold red", "crash": "bold red"}


def raised_at(tb: str | None) -> str:
    """'raised at train.py:12 in fn' from a recorded traceback's last frame, or ''."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb or "")
    if not frames:
        return ""
    path, line, fn = frames[-1]
    return f"raised at {PurePath(path).name}:{line} in {fn}"


def error_line(rec: dict, label: str) -> str:
    """'[bold red]label: error[/bold red]: RuntimeError: ... (raised at x.py:3 in f)'."""
    style = STYLE.get(rec["outcome"], "bold yellow")
    where = raised_at(rec.get("traceback"))
    message = escape(rec.get("error") or "no message") + (escape(f" ({where})") if where else "")
    return f"[{style}]{escape(label)}{rec['outcome']}[/{style}]: {message}"
