"""The runner on CPU: tiny real models train, the random-weight QLoRA model equals the from_pretrained one, and
sweeps survive kills, OOMs, crashes and timeouts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_bench.profiles import resolve_model
from qlora_bench.results import RESULTS_DIR, append_record, load_records, read_jsonl
from qlora_bench.settings import Settings

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "data" / "tiny-llama")

from qlora_bench.run import sweep as sw  # noqa: E402
from qlora_bench.run.config import RunConfig  # noqa: E402
from qlora_bench.run.materialize import build_model  # noqa: E402
from qlora_bench.run.train import RunOptions, run_config  # noqa: E402

OPT = RunOptions(steps=4, warmup=1, seed=0)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_tiny_model_trains_and_records_everything(method):
    spec = resolve_model(TINY)
    s = Settings(method=method, batch=2, seq=64, optimizer="adamw_torch" if method != "qlora" else "paged_adamw_8bit")
    said = []
    rec = run_config(spec, s, OPT, "t", progress=said.append)
    assert rec["outcome"] == "ok", rec.get("traceback")
    # the phases, as `run` shows them on stderr
    assert said[0] == "building tiny-llama on cpu" and said[-1] == "timed step 4/4 (last" + said[-1].split("(last")[1]
    assert "building tiny-llama: layer 2/2, " + ("quantizing to 4-bit (nf4)" if method == "qlora" else
                                                  "drawing random bf16 weights") in said
    assert "warm-up step 1/1" in said and any(x.startswith("timed step 1/4 (last ") for x in said)
    assert any(x.startswith("peft prepare_model_for_kbit_training") for x in said) == (method == "qlora")
    assert any(x.startswith("wrapping with peft LoRA (r=16") for x in said) == (method != "full")
    m = rec["measured"]
    assert m["losses"][-1] < m["losses"][0]  # fixed random batch: memorization makes the loss go down
    assert len(m["step_seconds"]) == OPT.warmup + OPT.steps and m["tokens_per_sec"] > 0
    for key in (
        "mem_after_cuda_init",
        "mem_after_model_build",
        "mem_after_load",
        "mem_after_train",
        "param_bytes_by_dtype_after_build",
        "param_bytes_by_dtype_after_wrap",
        "trainable_params",
        "total_params",
        "optimizer_state_bytes",
        "optimizer_class",
        "peak_allocated_bytes",
        "peak_device_bytes",
        "tokens_per_sec_min",
        "tokens_per_sec_max",
        "cpu_max_rss_bytes",
    ):
        assert key in m, key
    env = rec["environment"]
    assert env["versions"]["torch"] and env["versions"]["bitsandbytes"] and "git_commit" in env
    assert Settings.from_dict(rec["settings"]) == s
    if method == "full":
        assert m["trainable_params"] == spec.total_params
    else:
        assert m["param_bytes_by_dtype_after_wrap"]["float32"] >= m["trainable_params"] * 4
    if method == "qlora":
        # the 4-bit bytes equal the estimator's packed weights, the fp32 bytes its upcast + adapters
        from qlora_bench.estimate import estimate

        e = estimate(spec, s)
        assert m["param_bytes_by_dtype_after_build"]["uint8"] == e.phases["loss"]["weights_4bit"]
        assert m["param_bytes_by_dtype_after_wrap"]["float32"] == (
            e.phases["loss"]["weights_dense"] + e.phases["loss"]["lora_adapters"]
        )


def _inventory(model):
    """(name, type, dtype, shape, bytes) of every module's parameters and buffers, plus 4-bit quant states."""
    rows = []
    for name, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            rows.append(
                (f"{name}.{pname}", type(mod).__name__, str(p.dtype), tuple(p.shape), p.numel() * p.element_size())
            )
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
            rows.append(
                (
                    f"{name}.quant_state",
                    qs.quant_type,
                    str(qs.dtype),
                    tuple(qs.shape),
                    sum(t.numel() * t.element_size() for t in parts),
                )
            )
    return sorted(rows)


@pytest.mark.parametrize("double_quant", [True, False])
def test_random_qlora_model_equals_from_pretrained(tmp_path, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    spec = resolve_model(TINY)
    s = Settings(double_quant=double_quant)
    ours = build_model(spec, s, torch.device("cpu"))
    # the user path: a checkpoint loaded with a BitsAndBytesConfig
    src = build_model(spec, Settings(method="lora"), torch.device("cpu"))
    src.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        dtype=torch.bfloat16,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    )
    assert _inventory(ours) == _inventory(theirs)


def _sweep_file(tmp_path, grid, timeout=120, name="t"):
    import yaml

    f = tmp_path / "sweep.yaml"
    f.write_text(
        yaml.safe_dump({"name": name, "timeout_s": timeout, "options": {"steps": 2, "warmup": 1}, "grid": grid})
    )
    return f


def _cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "qlora_bench", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=REPO,
        **kw,
    )


def test_sharding_covers_the_grid_exactly_once(tmp_path):
    f = _sweep_file(
        tmp_path, [{"model": TINY, "method": ["full", "lora", "qlora"], "batch": [1, 2, 4], "seq": [32, 64]}]
    )
    sweep = sw.load_sweep(f)
    assert len(sweep.configs) == 18
    keys = [c.key for i in (1, 2, 3) for c in sw.shard(sweep.configs, i, 3)]
    assert sorted(keys) == sorted(c.key for c in sweep.configs)


def test_oom_is_recorded_and_bigger_configs_are_skipped(tmp_path):
    f = _sweep_file(tmp_path, [{"model": TINY, "method": "lora", "batch": [1, 2, 4], "seq": [32]}])
    out = tmp_path / "r.jsonl"
    r = _cli("sweep", str(f), "--out", str(out), "--no-progress", env={"QLORA_BENCH_FAULT": "oom@bs2x32"})
    assert r.returncode == 0, r.stderr
    outcomes = {d["settings"]["batch"]: d["outcome"] for d in read_jsonl(out)}
    assert outcomes == {1: "ok", 2: "oom", 4: "skipped_oom"}


@pytest.mark.parametrize("fault,outcome", [("segfault", "crash"), ("error", "error"), ("hang", "timeout")])
def test_crash_error_and_timeout_are_outcomes(tmp_path, fault, outcome):
    f = _sweep_file(tmp_path, [{"model": TINY, "method": "full", "batch": [1, 2], "seq": [32]}], timeout=25)
    out = tmp_path / "r.jsonl"
    r = _cli("sweep", str(f), "--out", str(out), "--no-progress", env={"QLORA_BENCH_FAULT": f"{fault}@bs1x32"})
    assert r.returncode == 0, r.stderr
    recs = {d["settings"]["batch"]: d for d in read_jsonl(out)}
    assert recs[1]["outcome"] == outcome and recs[1]["error"]
    assert recs[2]["outcome"] == "ok"  # the sweep went on
    assert len(load_records(out)) == 2


def test_killed_sweep_resumes(tmp_path):
    f = _sweep_file(tmp_path, [{"model": TINY, "method": ["full", "lora"], "batch": [1, 2], "seq": [32]}])
    out = tmp_path / "r.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_bench", "sweep", str(f), "--out", str(out), "--no-progress"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (out.is_file() and out.read_text().count("\n") >= 1):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, mid-run
    proc.wait()
    first = read_jsonl(out)
    assert 1 <= len(first) < 4
    with open(out, "a") as fh:
        fh.write('{"schema": 1, "kind": "tr')  # a torn write is tolerated
    r = _cli("sweep", str(f), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(out)
    keys = [d["key"] for d in recs]
    assert len(keys) == len(set(keys)) == 4
    assert {c.key for c in sw.load_sweep(f).configs} == set(keys)
    assert all(d["outcome"] == "ok" for d in recs)


def test_results_merge_and_table(tmp_path):
    f = _sweep_file(tmp_path, [{"model": TINY, "method": "full", "batch": [1], "seq": [32, 64]}])
    a, b, merged = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "m.jsonl"
    for i, out in ((1, a), (2, b)):
        r = _cli("sweep", str(f), "--out", str(out), "--shard", f"{i}/2", "--no-progress")
        assert r.returncode == 0, r.stderr
    r = _cli("results", str(a), str(b), "--merge", str(merged))
    assert r.returncode == 0 and len(read_jsonl(merged)) == 2
    r = _cli("results", str(merged))
    assert r.returncode == 0 and "tiny-llama" in r.stdout and "full" in r.stdout  # ids or their short labels
    from qlora_bench.results import to_dataframe

    df = to_dataframe(load_records(merged))
    assert list(df["outcome"]) == ["ok", "ok"] and (df["measured.tokens_per_sec"] > 0).all()


def test_run_config_identity_is_stable():
    c = RunConfig(TINY, Settings(), OPT)
    assert RunConfig.from_dict(json.loads(json.dumps(c.to_dict()))).key == c.key


@pytest.mark.gpu
def test_nvml_sampler_sees_an_allocation():
    from qlora_bench.run.probes import NvmlSampler

    nv = NvmlSampler().start()
    before = nv.used_now()
    x = torch.empty(512 * 1024**2, dtype=torch.uint8, device="cuda")
    time.sleep(0.1)
    peak = nv.stop()
    assert peak - before >= 500 * 1024**2
    del x


@pytest.mark.gpu
def test_short_gpu_run():
    rec = run_config(resolve_model(TINY), Settings(batch=2, seq=128), OPT, "gpu")
    assert rec["outcome"] == "ok"
    m = rec["measured"]
    assert m["peak_allocated_bytes"] > 0 and m["peak_device_bytes"] >= m["peak_reserved_bytes"]


def test_sft_trainer_path_records_the_same_fields():
    pytest.importorskip("trl")
    spec = resolve_model(TINY)
    s = Settings(batch=2, seq=64)
    rec = run_config(spec, s, RunOptions(steps=3, warmup=1, trainer="sft"), "sft")
    assert rec["outcome"] == "ok", rec.get("traceback")
    m = rec["measured"]
    assert len(m["step_seconds"]) == 4 and len(m["losses"]) == 4 and m["tokens_per_sec"] > 0
    assert "SFTTrainer" in rec["run"]["loop"] and m["optimizer_class"].startswith("bitsandbytes")
    assert m["param_bytes_by_dtype_after_wrap"] == run_config(spec, s, OPT, "loop")["measured"][
        "param_bytes_by_dtype_after_wrap"]
    assert RunConfig(TINY, s, RunOptions(trainer="sft")).name.endswith("/sft")


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_build_draws_each_weight_once_and_quantized_ones_only_one_at_a_time(monkeypatch, method):
    """Materialization allocates every 16-bit parameter once, and for QLoRA draws each 4-bit weight in 16-bit
    only inside _quantize_linear (one at a time): no 16-bit copy of the quantized model ever exists."""
    from qlora_bench.estimate.weights import non_quantized_params
    from qlora_bench.run import materialize

    spec = resolve_model(TINY)
    drawn = []
    real_init = materialize._init_param
    monkeypatch.setattr(materialize, "_init_param", lambda n, m, p, std: (drawn.append(p.numel()),
                                                                           real_init(n, m, p, std)))
    model = materialize.build_model(spec, Settings(method=method), torch.device("cpu"))
    expected = non_quantized_params(spec) if method == "qlora" else spec.total_params
    assert sum(drawn) == expected
    assert not any(p.is_meta for p in model.parameters())


def test_trains_on_a_text_file_with_a_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    text = "the quick brown fox jumps over the lazy dog " * 20
    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(set(text.split()))])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    (tmp_path / "corpus.txt").write_text(text)
    opts = RunOptions(steps=3, warmup=1, text=str(tmp_path / "corpus.txt"), tokenizer=str(tmp_path / "tok"))
    rec = run_config(resolve_model(TINY), Settings(method="lora", batch=2, seq=128), opts, "text")
    assert rec["outcome"] == "ok", rec.get("traceback")
    assert rec["run"]["text"] == opts.text and rec["run"]["tokenizer"] == opts.tokenizer
    assert any("repeated" in n for n in rec["notes"])  # 180 tokens of text for 2 x 128
    assert rec["measured"]["losses"][-1] < rec["measured"]["losses"][0]


# ---- CPU preflight, progress, library noise, error rendering, record ids ---------------------------------------
from qlora_bench.cli import main  # noqa: E402
from qlora_bench.run import preflight as pf  # noqa: E402
from qlora_bench.units import GiB  # noqa: E402


def test_cpu_preflight_refuses_real_size_models_and_passes_tiny_ones():
    tiny = pf.train_cost(resolve_model(TINY), Settings(seq=64), 8)
    assert pf.refusal("run", [(tiny, "tiny-llama")], available=16 * GiB) is None
    assert pf.refusal("run", [(tiny, "tiny-llama")], available=None) is None  # unknown: the fixed limits apply

    spec = resolve_model("llama-3.1-8b")
    lora = pf.train_cost(spec, Settings(method="lora", optimizer="adamw_torch"), 8)
    assert lora.bytes > spec.total_params * 2  # bf16 weights (the compute dtype the CPU run builds in), and more
    qlora = pf.train_cost(spec, Settings(), 8)
    assert qlora.bytes < lora.bytes and qlora.step_seconds > 60 and qlora.seconds == 8 * qlora.step_seconds
    msg = pf.refusal("run", [(qlora, "llama-3.1-8b")], available=15 * GiB)
    assert msg.startswith("run on CPU: llama-3.1-8b needs about ") and "GiB of RAM and ~" in msg
    assert "per step" in msg and "15 GiB available" in msg and "rough" in msg and "--yes" in msg
    assert "\n" not in msg
    # memory alone: a tiny run is refused where less is free than it needs
    assert "0.5 GiB available" in pf.refusal("run", [(tiny, "tiny-llama")], available=GiB // 2)
    # a sweep names its most expensive configuration and how many are too big
    msg = pf.refusal("sweep", [(tiny, "t/a"), (qlora, "8b/b"), (lora, "8b/c")], available=64 * GiB)
    assert "sweep on CPU: 8b/" in msg and "(2 of 3 configurations are too big)" in msg


def test_available_memory_falls_back_gracefully(monkeypatch):
    first = pf.available_memory()
    assert first is None or first > 0

    def unreadable(self, *a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(pf.Path, "read_text", unreadable)
    fallback = pf.available_memory()  # os.sysconf's free pages
    assert fallback is None or fallback > 0


@pytest.fixture
def no_gpu_no_training(monkeypatch):
    """As on a CPU-only machine, and any attempt to train fails the test (a refused run must not start)."""
    import qlora_bench.run.train as train

    monkeypatch.setattr(pf, "cuda_available", lambda: False)
    monkeypatch.setattr(train, "run_config", lambda *a, **k: pytest.fail("the run was not refused"))


def test_run_of_a_real_size_model_on_cpu_is_refused_at_once(tmp_path, capsys, no_gpu_no_training):
    t0 = time.time()
    assert main(["run", "--model", "llama-3.1-8b", "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora-bench: error: run on CPU: llama-3.1-8b needs about ") and err.count("\n") == 1
    assert "--yes" in err and not (tmp_path / "r.jsonl").exists() and time.time() - t0 < 20


def test_sweep_of_real_size_models_on_cpu_is_refused(tmp_path, capsys, no_gpu_no_training):
    out = tmp_path / "s.jsonl"
    assert main(["sweep", "--model", f"8b,{TINY}", "--method", "qlora", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sweep on CPU: llama-3.1-8b/qlora/" in err and "(1 of 2 configurations are too big)" in err
    assert "--yes" in err and not out.exists()
    assert main(["sweep", "--model", "8b", "--out", str(out), "--dry-run"]) == 0  # listing runs nothing


def test_yes_runs_what_the_preflight_refuses(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pf, "cuda_available", lambda: False)
    monkeypatch.setattr(pf, "MAX_SECONDS", 0.0)  # now even the tiny model is "too slow"
    args = ["run", "--model", TINY, "--method", "lora", "--seq", "32", "--steps", "1", "--warmup", "0",
            "--out", str(tmp_path / "r.jsonl"), "--json"]
    assert main(args) == 2
    assert "run on CPU: tiny-llama" in capsys.readouterr().err
    assert main([*args, "--yes"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "ok"


NOISE = ("Warning", "warnings.warn", "kernels-community", "Paged optimizers", "deprecated", "[transformers]")


def test_run_prints_progress_on_stderr_and_no_library_noise(tmp_path):
    out = tmp_path / "r.jsonl"
    args = ["run", "--model", TINY, "--method", "qlora", "--seq", "32", "--steps", "2", "--warmup", "1",
            "--trainer", "both", "--out", str(out)]
    r = _cli(*args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not [n for n in NOISE if n in r.stderr], r.stderr
    for phase in ("building tiny-llama: layer 2/2, quantizing to 4-bit (nf4)", "prepare_model_for_kbit_training",
                  "wrapping with peft LoRA", "building optimizer paged_adamw_8bit", "setting up trl SFTTrainer",
                  "warm-up step 1/1", "timed step 2/2 (last "):
        assert phase in r.stderr, (phase, r.stderr)
    assert "tiny-llama/qlora" in r.stdout and "timed step" not in r.stdout
    r = _cli(*args[:-4], "--out", str(out), "--json", timeout=300)  # --json: stdout pure JSON, stderr silent
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["outcome"] == "ok"


def test_quiet_libraries_drops_chatter_and_keeps_what_matters():
    import logging
    import warnings

    from qlora_bench.run.quiet import quiet_libraries

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            for text, category, module in (
                ("`gradient_checkpointing_enable` is deprecated", FutureWarning, "transformers.modeling_utils"),
                ("old", DeprecationWarning, "torch.utils.checkpoint"),
                ("Paged optimizers are not supported on CPU.", UserWarning, "bitsandbytes.optim.optimizer"),
                ("kept: a user warning from a library", UserWarning, "peft.tuners.lora"),
                ("kept: not from those libraries", FutureWarning, "qlora_bench.run.train"),
                ("kept: a runtime warning", RuntimeWarning, "torch.nn.functional"),
            ):
                warnings.warn_explicit(text, category, "f.py", 1, module=module)
            assert not bnb.isEnabledFor(logging.WARNING) and bnb.isEnabledFor(logging.ERROR)
            hf = logging.getLogger("transformers.modeling_utils")
            assert not hf.isEnabledFor(logging.WARNING) and hf.isEnabledFor(logging.ERROR)
    assert [str(w.message) for w in seen] == [
        "kept: a user warning from a library", "kept: not from those libraries", "kept: a runtime warning"]
    assert bnb.isEnabledFor(logging.WARNING)  # restored afterwards


def test_an_error_record_shows_its_message(capsys):
    from qlora_bench import render

    rec = run_config(resolve_model(TINY), Settings(method="lora", seq=32), RunOptions(steps=1, warmup=0), "e")
    rec.update(outcome="error", error="RuntimeError: shapes [2, 3] and [/b] differ [b]x[/b]",
               traceback='Traceback:\n  File "/x/qlora_bench/run/train.py", line 7, in _train_loop\n')
    render.run_record(rec, resolve_model(TINY))
    out = " ".join(capsys.readouterr().out.split())
    assert "error: RuntimeError: shapes [2, 3] and [/b] differ [b]x[/b] (raised at train.py:7 in _train_loop)" in out
    assert "measured" not in out  # no table of dashes for a run that measured nothing


def test_record_ids_name_the_model_not_its_file(tmp_path):
    s = Settings()
    assert RunConfig(TINY, s).name.startswith("tiny-llama/qlora/")
    assert RunConfig(f"{TINY}/config.json", s).name.startswith("tiny-llama/qlora/")
    assert RunConfig(f"{TINY}/", s).name.startswith("tiny-llama/qlora/")
    assert RunConfig(str(tmp_path / "My Model.json"), s).name.startswith("my_model/qlora/")
    assert RunConfig("8b", s).name.startswith("llama-3.1-8b/qlora/")  # an alias: the profile's name
    assert RunConfig("llama-3.1-8b", s).name.startswith("llama-3.1-8b/qlora/")
    assert RunConfig(TINY, s).key != RunConfig(f"{TINY}/config.json", s).key  # the model as given stays in the key


def test_a_diverged_loss_is_recorded_as_null(tmp_path):
    """JSON has no NaN: a NaN loss (fp16 overflow) becomes null and the record is still written and read."""
    from qlora_bench.run.train import finite_or_none

    assert finite_or_none(float("nan")) is None and finite_or_none(1.5) == 1.5
    rec = json.loads((RESULTS_DIR / "h100" / "hf-stack-shared.jsonl").read_text().splitlines()[0])
    rec["measured"]["losses"] = [2.0, finite_or_none(float("inf"))]
    append_record(tmp_path / "r.jsonl", rec)
    assert load_records(tmp_path / "r.jsonl")[0].measured["losses"] == [2.0, None]


def test_the_runner_never_writes_what_its_reader_refuses(tmp_path):
    from qlora_bench.errors import InputError

    rec = json.loads((RESULTS_DIR / "h100" / "hf-stack-shared.jsonl").read_text().splitlines()[0])
    rec["measured"]["peak_reserved_bytes"] = rec["measured"]["peak_allocated_bytes"] - 1
    with pytest.raises(InputError, match="peak_allocated_bytes"):
        append_record(tmp_path / "r.jsonl", rec)
    assert not (tmp_path / "r.jsonl").exists()


def test_empty_sections_of_a_sweep_file_are_absent(tmp_path):
    from qlora_bench.run.sweep import load_sweep

    (tmp_path / "s.yaml").write_text("defaults:\n  # method: lora\noptions:\ngrid:\n  - model: 8b\n    method: QLoRA\n"
                                     "    seq: 8k\n")
    sweep = load_sweep(tmp_path / "s.yaml")
    assert [(c.settings.method, c.settings.seq) for c in sweep.configs] == [("qlora", 8192)]
