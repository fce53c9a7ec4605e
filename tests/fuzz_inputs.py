"""Machinery for the bad-input fuzz tests (tests/test_fuzz_inputs.py): run the CLI in-process under a hang
guard, check the contract for bad input, and collect violations instead of failing (a catalogue).

The contract (README, "The command line"; qlora_bench/cli.py):
- nothing but SystemExit escapes `main`, and stderr never holds a Python traceback;
- the exit status is 0 (accepted), 2 (refused) or, for `compare` only, 1 (a regression was found);
- a refusal prints exactly one line starting with `qlora-bench: error:` (only `qlora-bench: warning:` lines may
  come before it, nothing after it), and that line names the offending flag, file or field;
- `--json` with status 0 prints valid JSON without NaN or Infinity;
- what the generator knows to be nonsense is refused, never answered with a verdict.

Environment:
- QLORA_BENCH_FUZZ_EXAMPLES: generated examples in all tests together (default 1100), split by each test's
  weight; the 195 inputs the contract names explicitly (`@example`) run on top of them, every time;
- QLORA_BENCH_FUZZ_COLLECT=FILE.jsonl: append each contract violation to FILE and keep going (a catalogue);
  a summary of the run goes to FILE.summary.json. Summarize with `python tests/fuzz_inputs.py FILE.jsonl`.
  While collecting, a kind of input that hung once is not run again (each hang costs the whole guard time);
- QLORA_BENCH_FUZZ_HANG_S: seconds before an example counts as hung (default 10; valid inputs take < 0.1 s).
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import urllib.error
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent

TOTAL_EXAMPLES = int(os.environ.get("QLORA_BENCH_FUZZ_EXAMPLES", "1100"))
COLLECT = os.environ.get("QLORA_BENCH_FUZZ_COLLECT") or None
HANG_SECONDS = float(os.environ.get("QLORA_BENCH_FUZZ_HANG_S", "10"))
# in collecting mode, a kind of input that hung this often is not run again (each hang costs HANG_SECONDS)
HANGS_BEFORE_SKIPPING = 1


def examples(weight: float) -> int:
    """This test's share of QLORA_BENCH_FUZZ_EXAMPLES."""
    return max(1, round(TOTAL_EXAMPLES * weight))


# ---- short descriptions (for messages and the catalogue) ---------------------------------------------------
def short(text: str, limit: int = 80) -> str:
    """A string as a message shows it: long runs of one character and long tails abbreviated."""
    text = re.sub(r"(.)\1{19,}", lambda m: f"{m.group(1) * 3}…({len(m.group(0))}×{m.group(1)!r})", str(text))
    return text if len(text) <= limit else f"{text[: limit - 20]}…({len(text)} chars)…{text[-12:]}"


def short_argv(argv: list[str]) -> str:
    return " ".join(short(a, 60) if a and not re.search(r"\s", a) else repr(short(a, 60)) for a in argv)


# ---- running the CLI ----------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the hang guard's alarm (a BaseException: `except Exception` in the code does not swallow it)."""


@contextlib.contextmanager
def hang_guard(seconds: float):
    """Raise Hang in the code after `seconds`, and again every 0.5 s after that: an alarm that lands in a
    finalizer or a garbage-collector callback is swallowed there ("Exception ignored in ..."), and a runaway
    loop that allocates a lot (a grid of 10^9 configurations) collects garbage all the time."""

    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield
    finally:
        while True:  # a repeat alarm may land right here: disarm until it sticks
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                break
            except Hang:
                continue


def _offline(*args, **kwargs):
    raise urllib.error.URLError("network disabled in the fuzz tests")


@dataclass
class Outcome:
    status: int | None  # None: an exception other than SystemExit escaped
    stdout: str
    stderr: str
    exception: BaseException | None = None
    origin: str | None = None  # the qlora_bench line the exception came from
    seconds: float = 0.0

    @property
    def hung(self) -> bool:
        return isinstance(self.exception, Hang)

    @property
    def stderr_lines(self) -> list[str]:
        """Non-blank lines, split at newlines only (a \\x1c or \\u2028 inside a message does not end a line)."""
        return [line.rstrip("\r") for line in self.stderr.split("\n") if line.strip()]


def qlora_bench_origin(exc: BaseException) -> str | None:
    """'qlora_bench/x.py:123 in func: source line' for the innermost frame of the package, else the innermost."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}qlora_bench{os.sep}" in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return None
    name = f.filename.split(f"{os.sep}qlora_bench{os.sep}", 1)[-1] if ours else f.filename
    code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f"{'qlora_bench/' if ours else ''}{name}:{f.lineno} in {f.name}: {short(code, 100)}"


def run_cli(argv: list[str], cwd: Path) -> Outcome:
    """`qlora_bench.cli.main(argv)` in this process, in `cwd`, offline, with stdout/stderr captured."""
    from qlora_bench.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd = os.getcwd()
    t0 = time.monotonic()
    status, exc = None, None
    try:
        os.chdir(cwd)
        with (
            mock.patch("urllib.request.urlopen", _offline),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            hang_guard(HANG_SECONDS),
        ):
            status = main(list(argv))
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    except BaseException as e:  # noqa: BLE001 - the point is to catch what escapes
        exc = e
    finally:
        os.chdir(old_cwd)
    outcome = Outcome(status, out.getvalue(), err.getvalue(), exc, seconds=time.monotonic() - t0)
    if exc is not None:
        outcome.origin = qlora_bench_origin(exc)
    return outcome


@contextlib.contextmanager
def example_dir():
    """A fresh temporary folder for one example's files, removed afterwards (FIFOs and broken links too)."""
    with tempfile.TemporaryDirectory(prefix="qlora-bench-fuzz-") as tmp:
        yield Path(tmp)


# ---- what an example expects --------------------------------------------------------------------------------
ACCEPT, REFUSE, EITHER = "accept", "refuse", "either"


@dataclass(frozen=True)
class Part:
    """One thing an example varied, what the tool must do about it, and the words that name it.

    verdict: accept (status 0), refuse (status 2) or either (0 or 2: odd but not nonsense).
    names: a refusal's error line must contain one of these (case-insensitive) when this part is to blame.
    """

    label: str
    verdict: str
    names: tuple[str, ...] = ()


@dataclass
class Invocation:
    """A built example: the command line, what each varied part expects, and checks of its own."""

    argv: list[str]
    parts: list[Part]
    files: dict[str, str] = field(default_factory=dict)  # name -> short description (for the catalogue)
    regression_possible: bool = False  # compare: exit status 1 (a regression) is a valid answer
    out_file: Path | None = None  # must not exist after a refusal (calibrate --out)
    torn_tail: tuple[str, ...] = ()  # a torn last line may be skipped, but only with a warning naming these

    @property
    def allowed(self) -> set[int]:
        verdicts = {p.verdict for p in self.parts}
        if REFUSE in verdicts:
            return {2}
        out = {0, 2} if EITHER in verdicts else {0}
        return out | ({1} if self.regression_possible else set())


def mentions(line: str, names: tuple[str, ...]) -> bool:
    """Whether the line names one of these (case-insensitive; grad_accum and grad-accum are the same name)."""
    low = line.lower().replace("_", "-")
    return any(n.lower().replace("_", "-") in low for n in names)


def contract_violations(inv: Invocation, out: Outcome) -> list[str]:
    """Every clause of the bad-input contract this outcome breaks, as short 'kind: detail' strings."""
    v = []
    if out.hung:
        return [f"hang: {out.exception}"]
    if out.exception is not None:
        return [f"exception: {type(out.exception).__name__}: {short(str(out.exception), 120)}"]
    if "Traceback" in out.stderr:
        v.append("traceback-in-stderr")
    lines = out.stderr_lines
    errors = [i for i, line in enumerate(lines) if line.startswith("qlora-bench: error:")]
    if out.status == 2 and errors and "unrecognized arguments:" in lines[errors[-1]]:
        # a flag this test uses that the tool does not know (yet): one root cause, not a naming problem
        return [f"unsupported-flag: {short(lines[errors[-1]].split('unrecognized arguments:')[1].split()[0])}"]
    if out.status not in (0, 1, 2) or (out.status == 1 and not inv.regression_possible):
        v.append(f"bad-status: exit status {out.status!r}")
    elif out.status not in inv.allowed:
        if out.status == 2:
            v.append(f"refused-valid: {short(lines[errors[-1]] if errors else out.stderr, 160)}")
        else:
            blamed = ", ".join(p.label for p in inv.parts if p.verdict == REFUSE)
            v.append(f"accepted-nonsense: exit {out.status} for {blamed}")
    if out.status == 2:
        if len(errors) != 1 or errors[0] != len(lines) - 1:
            v.append(f"stderr-format: {len(errors)} error line(s) among {len(lines)} lines")
        stray = [x for x in lines if not x.startswith(("qlora-bench: error:", "qlora-bench: warning:"))]
        if stray:
            v.append(f"stderr-format: stray line {short(stray[0], 80)!r}")
        if errors and out.status in inv.allowed:
            line = lines[errors[-1]]
            suspects = [p for p in inv.parts if p.verdict != ACCEPT]
            if not any(mentions(line, p.names) for p in suspects):
                valid = [p.label for p in inv.parts if p.verdict == ACCEPT and p.names and mentions(line, p.names)]
                wanted = sorted({n for p in suspects for n in p.names}, key=len)[:6]
                v.append(
                    f"refused-valid: {short(line, 160)} (blames {valid[0]})"
                    if valid
                    else f"error-names-nothing: {short(line, 140)} (expected one of {', '.join(wanted)})"
                )
    if out.status in (0, 1) and "--json" in inv.argv:
        try:
            json.loads(out.stdout, parse_constant=_refuse_constant)
        except ValueError as e:
            v.append(f"invalid-json: {short(str(e), 100)}")
    if out.status == 0 and inv.torn_tail:
        warnings = [x for x in lines if x.startswith("qlora-bench: warning:")]
        if not any(mentions(x, inv.torn_tail) for x in warnings):
            v.append("torn-line-skipped-silently: status 0 without a warning naming the file")
    if inv.out_file is not None:
        if out.status != 0 and os.path.lexists(inv.out_file):
            v.append(f"wrote-output-on-refusal: {inv.out_file.name} exists after exit {out.status}")
        if out.status == 0 and not os.path.isfile(inv.out_file):
            v.append(f"no-output: exit 0 but {inv.out_file.name} was not written")
    return v


def _refuse_constant(name: str):
    raise ValueError(f"{name} in --json output")


# ---- collecting or failing ----------------------------------------------------------------------------------
@dataclass
class Tally:
    examples: Counter = field(default_factory=Counter)
    violations: Counter = field(default_factory=Counter)
    hangs_by_tag: Counter = field(default_factory=Counter)
    skipped_after_hangs: Counter = field(default_factory=Counter)
    seconds: float = 0.0


TALLY = Tally()


def check_example(test: str, tag: str, build, hang_key: str | None = None) -> None:
    """Build one example in a fresh folder, run it, and fail (or, collecting, record) on a contract violation.

    `build(tmp) -> Invocation` writes the example's files into tmp and returns its command line. `tag` names the
    kind of input; `hang_key` (default: the tag) the kind that, once it hung, is not run again when collecting.
    """
    hang_key = (test, hang_key or tag)
    if COLLECT and TALLY.hangs_by_tag[hang_key] >= HANGS_BEFORE_SKIPPING:
        TALLY.skipped_after_hangs[":".join(hang_key)] += 1
        return
    with example_dir() as tmp:
        inv = build(tmp)
        out = run_cli(inv.argv, cwd=tmp)
        problems = contract_violations(inv, out)
    TALLY.examples[test] += 1
    TALLY.seconds += out.seconds
    if out.hung:
        TALLY.hangs_by_tag[hang_key] += 1
    if not problems:
        return
    TALLY.violations[test] += 1
    entry = {
        "test": test,
        "tag": tag,
        "hang_key": hang_key[1],
        "argv": short_argv(inv.argv),
        "files": inv.files,
        "expected": {p.label: p.verdict for p in inv.parts},
        "status": out.status,
        "stderr_tail": [short(x, 300) for x in out.stderr_lines[-3:]],
        "exception": None if out.exception is None else f"{type(out.exception).__name__}: {short(str(out.exception))}",
        "origin": out.origin,
        "violations": problems,
        "seconds": round(out.seconds, 3),
    }
    if COLLECT:
        with open(COLLECT, "a") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return
    details = "\n  ".join(f"{k}: {v}" for k, v in entry.items())
    raise AssertionError(f"bad-input contract broken:\n  {details}")


def write_summary() -> None:
    if not COLLECT:
        return
    summary = {
        "examples": dict(TALLY.examples),
        "examples_total": sum(TALLY.examples.values()),
        "violating_examples": dict(TALLY.violations),
        "skipped_after_repeated_hangs": dict(TALLY.skipped_after_hangs),
        "cli_seconds": round(TALLY.seconds, 1),
    }
    Path(COLLECT + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")


# ---- files ----------------------------------------------------------------------------------------------------
PLACEHOLDER = "__FUZZ_VALUE__"


def dumps_with_raw(data, raw: str | None = None, **kw) -> str:
    """JSON text of `data` with the string PLACEHOLDER (where a mutation put it) replaced by raw JSON text, so
    the file can hold what json.dumps never writes: NaN, Infinity, 1e999, 5,000 digits, deep nesting."""
    text = json.dumps(data, **kw)
    return text if raw is None else text.replace(json.dumps(PLACEHOLDER), raw)


def write_odd_entry(path: Path, kind: str) -> str:
    """Put something that is not a readable regular file at `path`; returns what it is, in words."""
    if kind == "fifo":
        os.mkfifo(path)
        return "a FIFO (no writer)"
    if kind == "folder":
        path.mkdir()
        return "a folder"
    if kind == "dangling-symlink":
        os.symlink(path.parent / "does-not-exist", path)
        return "a symlink to nothing"
    if kind == "symlink-loop":
        os.symlink(path.name, path)
        return "a symlink to itself"
    raise ValueError(kind)


ODD_ENTRIES = ("fifo", "folder", "dangling-symlink", "symlink-loop")


# ---- summarizing a catalogue --------------------------------------------------------------------------------
def _normalized(line: str) -> str:
    line = re.sub(r"/tmp/qlora-bench-fuzz-[^\s:'\"]*", "TMP", line)
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    return re.sub(r"-?\d[\d.e+]*", "N", line)[:110]


def _subject(label: str) -> str:
    """What a part varied, without its value: a flag, a file's top-level field, a kind of line or sweep edit."""
    for pattern, shown in (
        (r"(--[\w-]+)", "{}"),
        (r"Edit\(([\w-]+)", "field {}"),
        (r"LineEdit\((\S+)", "line: {}"),
        (r"SweepEdit\((\w+ \w+)", "sweep {}"),
    ):
        m = re.match(pattern, label)
        if m:
            return shown.format(m.group(1))
    return _normalized(label)


def root_cause(entry: dict) -> str:
    """A grouping key: the qlora_bench line an exception came from, the kind of input that hung, else the kind
    of violation and what it was about."""
    first = entry["violations"][0]
    kind = first.split(":", 1)[0]
    if kind == "exception":
        return f"exception at {entry['origin']}"
    if kind == "hang":
        return f"hang [{entry['test']}] {entry.get('hang_key', entry['tag'])}"
    if kind == "unsupported-flag":
        return first
    if kind in ("refused-valid", "error-names-nothing"):
        return f"{kind} [{entry['test']}] {_normalized(entry['stderr_tail'][-1] if entry['stderr_tail'] else '')}"
    if kind == "accepted-nonsense":
        blamed = sorted({_subject(label) for label, verdict in entry["expected"].items() if verdict == "refuse"})
        return f"{kind} [{entry['test']}] {' + '.join(blamed)}"
    return f"{kind} [{entry['test']}]"


def summarize(path: str) -> str:
    entries = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    groups = defaultdict(list)
    for e in entries:
        groups[root_cause(e)].append(e)
    out = [f"{len(entries)} violating examples, {len(groups)} groups"]
    for key, es in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ex = min(es, key=lambda e: len(e["argv"]) + len(json.dumps(e["files"])))
        out.append(f"\n[{len(es)}] {key}")
        out.append(f"    tags: {dict(Counter(e['test'] + ':' + e['tag'] for e in es).most_common(6))}")
        if key.startswith("exception"):
            out.append(f"    exceptions: {dict(Counter(e['exception'].split(':')[0] for e in es))}")
        out.append(f"    e.g.: qlora-bench {ex['argv']}")
        for name, what in ex["files"].items():
            out.append(f"          {name}: {what}")
        out.append(f"          -> {ex['violations'][0]}")
        if ex["stderr_tail"]:
            out.append(f"          stderr: {ex['stderr_tail'][-1][:200]}")
    return "\n".join(out)


if __name__ == "__main__":  # python tests/fuzz_inputs.py /tmp/fuzz-failures.jsonl
    print(summarize(sys.argv[1]))
