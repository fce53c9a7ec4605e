"""Every table reads in an 80- and a 120-column terminal: no line runs over, numbers and names never break in the
middle, and records are told apart by short unique labels."""

import os
import subprocess
import sys

import pytest

from qlora_bench.render import short_labels
from qlora_bench.results import RESULTS_DIR, load_records

COMMANDS = {
    "plan": ["plan", "--model", "70b", "--gpu", "48gb"],
    "plan-all": ["plan", "--model", "8b", "--gpu", "24gb", "--method", "all"],
    "validate": ["validate", str(RESULTS_DIR)],
    "results": ["results", str(RESULTS_DIR)],
    "profiles": ["profiles"],
    "infer": ["infer", "--model", "8b", "--gpu", "24gb"],
    "compare": ["compare", str(RESULTS_DIR / "h100"), str(RESULTS_DIR / "h100")],
}


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def _device(model: str, **kw) -> str:
    """The device peak the estimator gives now, as the tables print it (an estimate, not a measurement)."""
    from qlora_bench.estimate import estimate
    from qlora_bench.profiles import resolve_model
    from qlora_bench.settings import DEFAULT_OPTIMIZER, Settings

    method = kw.get("method", "qlora")
    return _gib(estimate(resolve_model(model), Settings(optimizer=DEFAULT_OPTIMIZER[method], **kw)).peak_device_bytes)


def _infer_base16() -> str:
    from qlora_bench.estimate.inference import InferSettings, estimate_inference
    from qlora_bench.profiles import resolve_model
    from qlora_bench.settings import Settings

    return _gib(estimate_inference(resolve_model("8b"), Settings(), InferSettings(), "base16").peak_device_bytes)


# words that must appear whole on some line: a flag, a profile name, a number (computed, so that a changed
# estimator still has to print it whole)
WHOLE = {
    "plan": ["--no-upcast-non-quantized", "--gpu a100-80gb", "none fits", _device("70b")],
    "plan-all": ["does not fit", _device("8b", method="full"), "none fits"],
    "validate": ["llama-3.1-8b", "from_pretrained", "nf4-nodq", "false fits"],
    "results": ["llama-3.2-1b", "from_pretrained", "43,751"],
    "profiles": ["llama-3.1-70b", "mixtral-8x7b", "h100-sxm", "rtx-a6000", "140.40"],
    "infer": ["merged16", "adapters4", _infer_base16(), "KV cache"],
    "compare": ["llama-3.1-8b full bs1x2048", "no regression"],
}


def _run(args, columns):
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb"}
    r = subprocess.run([sys.executable, "-m", "qlora_bench", *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_fits_the_terminal(name, columns):
    out = _run(COMMANDS[name], columns)
    lines = out.splitlines()
    too_long = [line for line in lines if len(line.rstrip()) > columns]
    assert not too_long, too_long[:3]
    for word in WHOLE[name]:
        assert any(word in line for line in lines), (word, out[:3000])


def test_validate_rows_take_one_or_two_lines_at_80():
    """At 80 columns a record's row wraps at most once (it wrapped over 13 lines with full ids)."""
    out = _run(COMMANDS["validate"], 80)
    table = out.split("fits?")[1].split("set: fit")[0]
    rows = [line for line in table.splitlines()[2:] if line.strip()]
    n_records = sum(1 for line in rows if line.startswith(" llama"))
    assert n_records >= 10 and len(rows) <= 2 * n_records


def test_short_labels_are_unique_and_readable():
    ids = [r.id for r in load_records(RESULTS_DIR / "h100" / "hf-stack-shared.jsonl")]
    labels = short_labels(ids)
    assert len(set(labels)) == len(labels)
    assert "llama-3.1-8b qlora bs1x2048 repeat" in labels and "llama-3.1-8b qlora bs1x2048" in labels
    assert "llama-3.1-8b qlora bs1x2048 nf4-nodq" in labels
    assert short_labels(["a/b/bs1x2", "a/b/bs1x2"]) == ["a b bs1x2 #1", "a b bs1x2 #2"]
