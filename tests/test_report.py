"""The report: regenerates byte for byte, matches the committed one (golden Markdown tables), and renders in a
real headless browser with every image loaded."""

import json
import re
import shutil
import subprocess

import pytest

pytest.importorskip("matplotlib")

from qlora_bench.report import build_report  # noqa: E402
from qlora_bench.report.render import md_table  # noqa: E402
from qlora_bench.results import REPO_ROOT, RESULTS_DIR  # noqa: E402

COMMITTED = REPO_ROOT / "report"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    build_report([RESULTS_DIR], a)
    build_report([RESULTS_DIR], b)
    return a, b


def test_regenerates_byte_for_byte(built):
    a, b = built
    names = sorted(p.name for p in a.iterdir())
    assert names == ["README.md", "memory-breakdown.png", "predicted-vs-measured.png", "report.html",
                     "throughput.png"]
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_committed_report_is_current(built):
    """Golden file: the committed report's Markdown (every table) equals a fresh build from the committed
    results. After changing the estimator or the results, rerun `qlora-bench report` and commit report/."""
    a, _ = built
    assert (a / "README.md").read_text() == (COMMITTED / "README.md").read_text()


def test_markdown_tables():
    assert md_table([{"a": "x|y", "b": 1}]) == "| a | b |\n|---|---|\n| x\\|y | 1 |\n"
    text = (COMMITTED / "README.md").read_text()
    for heading in ("Accuracy against the targets", "Predicted vs measured", "Feasibility matrix",
                    "What the guides claim", "Where the measurements come from"):
        assert f"## {heading}" in text
    section = text.split("## What the guides claim")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert len(rows) == 10
    assert all(re.match(r"\| .+? \| (true|false|untested|only without)", r) for r in rows)


def test_html_is_self_contained(built):
    a, _ = built
    page = (a / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 3
    assert not re.search(r'src="(?!data:)', page) and "<script" not in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="needs Chromium (Debian package chromium)")
def test_renders_in_headless_chromium(built, tmp_path):
    a, _ = built
    probe = ("<script>window.addEventListener('load', () => { const im = [...document.images]; "
             "document.title = JSON.stringify({images: im.length, "
             "loaded: im.filter(i => i.complete && i.naturalWidth > 0).length, "
             "tables: document.querySelectorAll('table').length, "
             "rows: document.querySelectorAll('tbody tr').length}); });</script></body>")
    page = (a / "report.html").read_text().replace("</body>", probe)
    f = tmp_path / "probe.html"
    f.write_text(page)
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", f.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    m = re.search(r"<title>(\{.*?\})</title>", out.stdout)
    assert m, out.stderr[-2000:]
    seen = json.loads(m.group(1).replace("&quot;", '"'))
    assert seen["images"] == 3 and seen["loaded"] == 3
    assert seen["tables"] >= 7 and seen["rows"] >= 30
