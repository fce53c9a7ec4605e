"""The estimator against `trace` (qlora_bench/crosscheck.py).

CI traces the smoke grid (four cheap real-size configurations) and holds the estimator to the targets there; the
committed full grid (results/crosscheck/grid.json, `nox -s crosscheck`) must cover >= 200 configurations of every
family, and its analytic side must be what the estimator says now (rerun `qlora-bench crosscheck --grid full`
after changing the estimator: traced rows are kept, the analytic side is refreshed).
"""

import pytest

from qlora_bench import crosscheck
from qlora_bench.results import RESULTS_DIR
from qlora_bench.settings import Settings

GRID = RESULTS_DIR / "crosscheck" / "grid.json"
shim = pytest.importorskip("qlora_bench.trace.shim")


def _can_trace() -> bool:
    return shim.library_path().is_file() or not shim.missing_tools()


@pytest.mark.skipif(not _can_trace(), reason="no C++ compiler / torch headers for the fake-CUDA shim")
@pytest.mark.parametrize("case", crosscheck.grid("smoke"), ids=lambda c: c.id)
def test_smoke_grid_meets_the_targets(case):
    row = crosscheck.check(case, steps=2)
    assert row["trace"], row.get("error")
    assert abs(row["allocated_diff"]) <= crosscheck.ALLOCATED_TOLERANCE, row
    assert abs(row["reserved_diff"]) <= crosscheck.RESERVED_TOLERANCE, row


DATA = RESULTS_DIR.parent / "tests" / "data"
MECHANISMS = [
    # peft's ParamWrapper folding LoRA into the stacked experts each forward; transformers' grouped_mm routing
    crosscheck.Case(
        str(DATA / "mixtral-2-layers"),
        Settings(method="lora", optimizer="adamw_torch_fused", dropout=0.0, batch=2, seq=512,
                 gradient_checkpointing=False),
    ),
    # checkpoint's early stop, torch.matmul's reshape copies (b > 1), Phi-3's rotary cat, eager's weights kept
    crosscheck.Case(
        str(DATA / "phi3-2-layers"),
        Settings(method="lora", optimizer="adamw_torch_fused", batch=2, seq=1024, attn="eager"),
    ),
]


@pytest.mark.skipif(not _can_trace(), reason="no C++ compiler / torch headers for the fake-CUDA shim")
@pytest.mark.parametrize("case", MECHANISMS, ids=lambda c: c.model.rsplit("/", 1)[-1])
def test_mechanisms_on_two_real_size_layers(case):
    """Real-size layers (two of them: a trace in seconds) of the families whose code paths differ most."""
    row = crosscheck.check(case, steps=2)
    assert row["trace"], row.get("error")
    assert abs(row["allocated_diff"]) <= crosscheck.ALLOCATED_TOLERANCE, row
    assert abs(row["reserved_diff"]) <= crosscheck.RESERVED_TOLERANCE, row


def test_committed_grid_covers_every_family_and_is_current():
    rows = crosscheck.read_rows(GRID)
    traced = [r for r in rows if r.get("trace")]
    assert len(traced) == len(rows) >= 200, [r["case"] for r in rows if not r.get("trace")]
    assert {r["model"] for r in traced} >= set(crosscheck.FAMILIES)
    missed = [(r["case"], r["allocated_diff"], r["reserved_diff"]) for r in traced if not r["within"]]
    assert not missed, missed  # the targets hold on every committed configuration
    for r in traced[:: max(1, len(traced) // 25)]:  # a sample: each refresh replays a whole step
        fresh = crosscheck.with_analytic(r, crosscheck.Case(r["model"], Settings.from_dict(r["settings"])))
        assert fresh["analytic"] == r["analytic"], (r["case"], "rerun: qlora-bench crosscheck --grid full")


def test_grid_has_the_configurations_the_issue_asks_for():
    cases = crosscheck.grid("full")
    assert len(cases) >= 200
    s = [c.settings for c in cases]
    assert {x.method for x in s} == {"full", "lora", "qlora"}
    assert {x.gradient_checkpointing for x in s} == {True, False}
    assert {x.attn for x in s} == {"sdpa", "eager"}  # (Gemma-2: eager only; transformers refuses sdpa for it)
    assert len({(x.batch, x.seq) for x in s}) >= 3
    assert any(not x.double_quant for x in s) and any(not x.upcast_non_quantized for x in s)
    assert {x.compute_dtype for x in s} == {"bf16", "fp32"}  # fp32: SDPA's math / memory-efficient kernels
    assert len({c.id for c in cases}) == len(cases)
