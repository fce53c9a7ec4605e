"""`qlora-bench trace` on a tiny llama: what the fake-CUDA trace records against what is real.

- the parameter bytes the trace records while loading equal the bytes of the same model built for real on the CPU
  (and the estimator's weight components);
- a full fine-tuning step without checkpointing (fp32, eager attention: no device-dependent branch) allocates on
  fake CUDA exactly what the same step allocates for real on the CPU, op for op, and what it keeps for backward
  is what autograd saves;
- paged optimizer state is bitsandbytes' state, counted apart from the allocator;
- two traces give identical events; the command line's JSON and its refusals.
The worker needs a C++ compiler for the fake-CUDA shim: those tests skip without one. Each trace of the tiny model
takes ~5 s (mostly imports in the worker).
"""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from qlora_bench.cli import main  # noqa: E402
from qlora_bench.estimate import estimate  # noqa: E402
from qlora_bench.profiles import resolve_model  # noqa: E402
from qlora_bench.settings import Settings  # noqa: E402
from qlora_bench.trace import shim, trace  # noqa: E402
from qlora_bench.trace.patches import sdpa_backend  # noqa: E402
from qlora_bench.trace.tracer import Recorder, flash_backward_scratch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "tests" / "data" / "tiny-llama")
BLOCKWISE_MAP = 256 * 4  # bitsandbytes' module-level 8-bit map (fp32), shared by every double-quantized weight


def _can_build() -> bool:
    return shim.library_path().is_file() or not shim.missing_tools()


needs_shim = pytest.mark.skipif(not _can_build(), reason="no C++ compiler / ninja / torch headers for the shim")


@pytest.fixture(scope="module")
def spec():
    return resolve_model(TINY)


_TRACES = {}


def traced(spec, s: Settings, steps: int = 1):
    """One trace per configuration per test session (each costs a worker process)."""
    key = (s, steps)
    if key not in _TRACES:
        _TRACES[key] = trace(spec, s, steps=steps, keep_events=True)
    return _TRACES[key]


def _live_at(events, phase):
    """Live allocations (key -> event) when the phase marker `phase` is reached."""
    live = {}
    for e in events:
        if e[0] == "alloc":
            live[e[1]] = e
        elif e[0] == "free":
            live.pop(e[1], None)
        elif e[0] == "phase" and e[1] == phase:
            return live
    raise AssertionError(f"no phase {phase}")


def _allocs_between(events, start, stop, skip=("workspaces",)):
    out, on = [], False
    for e in events:
        if e[0] == "phase":
            on = on or e[1] == start
            if e[1] == stop:
                break
        elif on and e[0] == "alloc" and e[3] not in skip:
            out.append((e[2], e[3]))
    return out


def _peak_until(events, stop, skip=("workspaces",)):
    live, cur, best = {}, 0, 0
    for e in events:
        if e[0] == "phase" and e[1] == stop:
            break
        if e[0] == "alloc" and e[3] not in skip:
            live[e[1]] = e[2]
            cur += e[2]
            best = max(best, cur)
        elif e[0] == "free" and e[1] in live:
            cur -= live.pop(e[1])
    return best


def _real_cpu_model(spec, s):
    from qlora_bench.run.materialize import add_adapters, build_model, prepare_base

    torch.manual_seed(0)
    return add_adapters(prepare_base(build_model(spec, s, torch.device("cpu")), s), spec, s)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


# ---- no worker needed ----------------------------------------------------------------------------------------
def test_recorder_sees_new_storages_and_frees_on_cpu():
    """The recorder alone, on real CPU tensors: a view or an in-place op allocates nothing, a new result does, and
    a storage's free is recorded when its last tensor goes."""
    rec = Recorder(device_type="cpu")
    with rec:
        rec.phase("fwd1", "fwd")
        a = torch.ones(1000)
        b = a.view(10, 100)
        a.add_(1)
        c = a * 2
        del a, b
        del c
    ev = rec.finish()
    assert [e[:3] for e in ev if e[0] == "alloc"] == [("alloc", 0, 4000), ("alloc", 1, 4000)]
    assert [e for e in ev if e[0] == "free"] == [("free", 0), ("free", 1)]
    assert all(e[3] == "temporaries" for e in ev if e[0] == "alloc")


def test_flash_backward_scratch_from_the_kernel_source():
    """mha_bwd's scratch for Llama-3.1-8B at 2048 tokens (32 query heads, 8 kv heads, head dim 128): softmax_d
    32*2048*4, dq_accum 2048*32*128*4, dk/dv expanded to 32 heads 2*2048*32*128*2 bytes."""
    q = torch.empty(1, 32, 2048, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, 2048, 128, dtype=torch.bfloat16, device="meta")
    assert flash_backward_scratch(q, k) == [262144, 33554432, 16777216, 16777216]
    assert flash_backward_scratch(q, q) == [262144, 33554432]  # no grouped-query: no expanded dk / dv
    odd = torch.empty(2, 4, 100, 72, dtype=torch.float16, device="meta")  # rounded: s to 128, head dim to 96
    assert flash_backward_scratch(odd, odd) == [2 * 4 * 128 * 4, 2 * 128 * 4 * 96 * 4]


@pytest.mark.parametrize(
    "dtype,mask,kv_heads,head_dim,backend",
    [
        (torch.bfloat16, False, 8, 128, "flash"),  # Llama training: no mask, GQA, bf16
        (torch.float16, False, 32, 256, "flash"),
        (torch.bfloat16, True, 32, 128, "efficient"),  # a mask rules flash out
        (torch.float32, False, 32, 128, "efficient"),  # fp32 rules flash out
        (torch.float32, False, 8, 128, "math"),  # fp32 with grouped-query attention: neither kernel
        (torch.bfloat16, False, 32, 264, "efficient"),  # head dim above 256
        (torch.bfloat16, False, 32, 60, "math"),  # head dim not a multiple of 8
    ],
)
def test_sdpa_backend_choice(dtype, mask, kv_heads, head_dim, backend):
    q = torch.empty(1, 32, 16, head_dim, dtype=dtype, device="meta")
    k = torch.empty(1, kv_heads, 16, head_dim, dtype=dtype, device="meta")
    m = torch.empty(1, 1, 16, 16, dtype=torch.bool, device="meta") if mask else None
    assert sdpa_backend(q, k, k, m, 0.0, kv_heads != 32) == backend


def test_no_compiler_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(shim.SHIM_DIR_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setattr(shim.shutil, "which", lambda name: None)
    code = main(["trace", "--model", TINY, "--seq", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("qlora-bench: error: ")
    assert "C++ compiler" in err and "ninja" in err


@pytest.mark.parametrize(
    "args,names",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "21"], "--steps"),
        (["--method", "all"], "--method"),
        (["--model", "no-such-model-anywhere"], "no-such-model-anywhere"),
        (["--seq", "-5"], "--seq"),
    ],
)
def test_bad_flags_one_line_exit_2(capsys, args, names):
    argv = ["trace", "--model", TINY, *args]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and names in err, err


def test_plot_into_a_folder_is_refused_before_tracing(capsys, tmp_path):
    code = main(["trace", "--model", TINY, "--plot", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder" in err and err.count("\n") == 1


# ---- with the worker -----------------------------------------------------------------------------------------
@needs_shim
def test_shim_builds_once_then_comes_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(shim.SHIM_DIR_ENV, str(tmp_path))
    lib, seconds = shim.ensure_built()
    assert lib.is_file() and lib.is_relative_to(tmp_path) and seconds > 0
    again, seconds = shim.ensure_built()
    assert again == lib and seconds == 0


@needs_shim
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_parameters_at_load_are_the_real_models(spec, method):
    """What the trace records as parameters (and buffers) while loading is what the same code builds for real on
    the CPU, storage for storage; the estimator's weight components agree."""
    s = Settings(method=method, seq=64, optimizer="adamw_torch")
    r = traced(spec, s)
    at_fwd = _live_at(r.events, "fwd1")
    recorded = sum(e[2] for e in at_fwd.values() if e[3] == "parameters")
    model = _real_cpu_model(spec, s)
    params, buffers = list(model.parameters()), list(model.buffers())
    assert recorded == _storage_bytes(params + buffers)
    assert recorded == sum(r.param_bytes_by_dtype.values()) + _storage_bytes(buffers)
    c = estimate(spec, s).phases["loss"]  # the named weight terms, exact bytes
    weights = c.get("weights_dense", 0) + c.get("weights_4bit", 0) + c.get("lora_adapters", 0)
    assert recorded - _storage_bytes(buffers) == weights
    quant = sum(e[2] for e in at_fwd.values() if e[3] == "quant_state")
    assert quant == (c["quant_constants"] + BLOCKWISE_MAP if method == "qlora" else 0)
    # nothing from loading outlives it but what the model holds (and the input ids)
    assert {e[3] for e in at_fwd.values()} <= {"parameters", "quant_state", "inputs"}
    if method == "qlora":  # the 16-bit weights drawn before quantization and the bf16 -> fp32 upcast's originals
        assert sum(e[2] for e in r.events if e[0] == "alloc" and e[3] == "load") > 0


@needs_shim
def test_full_step_allocates_what_the_real_cpu_step_allocates(spec):
    """fp32 + eager attention + no checkpointing: nothing in the step depends on the device, so the fake-CUDA trace
    must allocate, in forward and backward, exactly the storages the real step allocates on the CPU (recorded by the
    same recorder), keep for backward exactly what autograd saves, and reach the same peak."""
    s = Settings(
        method="full",
        compute_dtype="fp32",
        attn="eager",
        gradient_checkpointing=False,
        optimizer="adamw_torch",
        batch=2,
        seq=32,
    )
    r = traced(spec, s)

    from qlora_bench.run.materialize import build_optimizer
    from qlora_bench.run.train import RunOptions, token_rows, train_step

    model = _real_cpu_model(spec, s)
    opt = build_optimizer(model, s)
    x, _ = token_rows(spec, s, RunOptions(), s.batch, torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    rec = Recorder(device_type="cpu")
    rec.adopt([*model.parameters(), *model.buffers(), x])  # built before recording: not allocations of the step
    with rec:

        def mark(kind):
            if kind == "bwd":
                rec.end_forward()
            if kind == "opt":
                rec.classify([p.grad for p in model.parameters()], "gradients")
            rec.phase(f"{kind}1", kind)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            train_step(model, opt, x, s, torch.device("cpu"), mark=mark)
    cpu = rec.finish()

    assert _allocs_between(r.events, "fwd1", "opt1") == _allocs_between(cpu, "fwd1", "opt1")
    kept = sum(e[2] for e in _live_at(r.events, "bwd1").values() if e[3] == "activations")
    loss = 4  # the fp32 loss, alive when backward starts; the input ids are saved (embedding) but not allocated here
    assert kept == sum(saved.values()) - x.untyped_storage().nbytes() + loss
    static = _storage_bytes(list(model.parameters()) + list(model.buffers())) + x.untyped_storage().nbytes()
    cpu_step_peak = _peak_until(cpu, "opt1") + static  # the CPU recorder started after loading
    assert _peak_until(r.events, "opt1") == cpu_step_peak
    assert r.attention == {}  # eager attention: no SDPA call
    # the replay's allocated peak is this peak in 512-byte blocks, plus the cuBLAS workspace
    assert r.peak_allocated_bytes >= cpu_step_peak + r.cublas_workspace_bytes


@needs_shim
def test_paged_bytes_are_bitsandbytes_state(spec):
    """paged_adamw_8bit keeps 8-bit state of tensors above 1e5 elements in managed memory (bitsandbytes 0.50
    Optimizer8bit.get_state_buffer): here the embedding and lm_head (1000 x 128 each), two uint8 states each. The
    trace counts them apart and never replays them."""
    pytest.importorskip("bitsandbytes")
    s = Settings(method="full", optimizer="paged_adamw_8bit", seq=64)
    r = traced(spec, s)

    from qlora_bench.run.materialize import build_optimizer
    from qlora_bench.run.train import RunOptions, token_rows, train_step

    model = _real_cpu_model(spec, s)
    opt = build_optimizer(model, s)
    x, _ = token_rows(spec, s, RunOptions(), s.batch, torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        train_step(model, opt, x, s, torch.device("cpu"))
    big = [st for p, st in opt.state.items() if p.numel() >= 1e5]  # paged on a GPU; plain zeros on the CPU
    expected = sum(st[k].untyped_storage().nbytes() for st in big for k in ("state1", "state2"))
    assert expected == 4 * 1000 * 128 and r.paged_bytes == expected == estimate(spec, s).paged_bytes
    assert r.peak_device_bytes == r.peak_reserved_bytes + r.context_bytes + r.paged_bytes
    replayed_states = sum(e[2] for e in r.events if e[0] == "alloc" and e[3] == "optimizer_states")
    every_state = _storage_bytes([v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])
    assert replayed_states == every_state - expected  # absmax, qmaps and the small tensors' states: replayed


@needs_shim
def test_two_traces_give_identical_events(spec):
    s = Settings(method="qlora", seq=64, optimizer="adamw_torch")  # the qlora trace of the parameters test
    a = traced(spec, s)
    b = trace(spec, s, steps=1, keep_events=True)
    assert a.events == b.events and a.event_ops == b.event_ops
    assert a.peak_allocated_bytes == b.peak_allocated_bytes and a.peak_reserved_bytes == b.peak_reserved_bytes
    assert a.attention == {"flash": 2 * spec.num_layers}  # forward + checkpoint recompute, per layer
    assert a.flash_scratch_bytes > 0 and a.paged_bytes == 0  # tiny LoRA tensors are below the paging threshold


@needs_shim
def test_cli_json_events_and_plot(capsys, tmp_path):
    events, plot = tmp_path / "ev.jsonl.gz", tmp_path / "mem.png"
    argv = ["trace", "--model", TINY, "--seq", "64", "--steps", "2", "--json", "--events", str(events)]
    import importlib.util

    if importlib.util.find_spec("matplotlib"):
        argv += ["--plot", str(plot)]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    d = json.loads(out)
    for key in (
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "peak_device_bytes",
        "paged_bytes",
        "breakdown",
        "peak_allocated_phase",
        "peak_reserved_phase",
        "fragmentation_at_peak_bytes",
        "ops",
        "seconds",
        "max_rss_bytes",
        "versions",
        "settings",
        "notes",
    ):
        assert key in d, key
    assert d["settings"]["method"] == "qlora" and d["steps"] == 2
    assert sum(d["breakdown"].values()) == d["peak_allocated_bytes"]  # block sizes at the allocated peak
    assert d["peak_reserved_bytes"] >= d["peak_allocated_bytes"]
    assert d["peak_device_bytes"] == d["peak_reserved_bytes"] + d["context_bytes"] + d["paged_bytes"]
    assert d["peak_allocated_phase"][:3] in ("fwd", "bwd") and set(d["versions"]) >= {"torch", "transformers"}
    assert {"parameters", "activations", "workspaces"} <= set(d["breakdown"])
    from qlora_bench.trace import load_events

    ev, ops = load_events(events)
    assert [e[1] for e in ev if e[0] == "phase"] == [
        "load",
        "fwd1",
        "bwd1",
        "opt1",
        "zero1",
        "fwd2",
        "bwd2",
        "opt2",
        "zero2",
        "end",
    ]
    assert ops[next(e[1] for e in ev if e[3:] == ("workspaces",))] == "cublas_workspace"
    if plot in [Path(a) for a in argv]:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_shim
def test_plan_answers_with_the_trace():
    """plan --trace: the verdict and peaks come from the trace (the estimator's figure is in a note)."""
    import contextlib
    import io

    argv = ["plan", "--model", "qwen2.5-0.5b", "--gpu", "24gb", "--seq", "256", "--trace", "--json"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    d = json.loads(out.getvalue())
    assert any(n.startswith("answered by trace") for n in d["notes"])
    assert sum(d["components"].values()) == d["peak_device_bytes"]
    t = trace(resolve_model("qwen2.5-0.5b"), Settings(seq=256), steps=2)
    assert d["peak_reserved_bytes"] == t.peak_reserved_bytes
