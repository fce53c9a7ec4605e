"""qlora-bench command line: thin commands over profiles -> estimate -> plan (and the results store).

Bad input prints one line (`qlora-bench: error: ...`) and exits 2; a verdict, fit or not, exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from . import flags
from .compare import Tolerances
from .errors import InputError
from .profiles import gpu_slug
from .schema import field_rule
from .settings import ATTN, DEFAULT_OPTIMIZER, DTYPES, METHODS, OPTIMIZERS, QUANT_TYPES, Settings

MODEL_HELP = "profile name or alias (70b, llama-3.1-8b), a config.json file or folder, or a hub id"
YES_HELP = "without a GPU, run even what would need more RAM than is free or take more than a minute on the CPU"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"qlora-bench: error: {message} (see {self.prog} --help)\n")


def _bounded(name: str, units: dict | None = None):
    """A whole-number flag with the bounds of the Settings field it sets."""
    r = field_rule(Settings, name)
    return flags.count(int(r.ge), int(r.le), units)


def _ranged(cls, name: str):
    """A number flag with the bounds of the schema field it sets."""
    r = field_rule(cls, name)
    lo = r.gt if r.gt is not None else r.ge
    hi = r.lt if r.lt is not None else r.le
    return flags.number(lo, hi, lo_open=r.gt is not None, hi_open=r.lt is not None)


_positive_int = flags.count(1, 1 << 20)
_alpha = _ranged(Settings, "alpha")
_timeout = flags.number(0, 7 * 86400, lo_open=True)  # seconds per configuration: a week at most


def _json(data) -> str:
    """--json output: strict JSON (NaN or Infinity would not parse anywhere else)."""
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False)


def add_settings_args(p: argparse.ArgumentParser, methods=(*METHODS, "all")) -> None:
    """The settings vocabulary shared by plan, run and sweep. Names are case-insensitive (`--method QLoRA`)."""
    d = Settings()
    g = p.add_argument_group("training settings")

    def on_off(flag: str, default: bool, help: str) -> None:  # --x / --no-x
        g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)

    def named(flag: str, choices, default, help: str) -> None:
        g.add_argument(flag, type=flags.choice(choices), choices=list(choices), default=default, help=help)

    named("--method", methods, d.method, "fine-tuning method (default qlora)")
    g.add_argument("--batch", type=_bounded("batch"), default=d.batch, help="micro-batch size (default 1)")
    g.add_argument(
        "--seq", type=_bounded("seq", flags.BINARY), default=d.seq, help="tokens per sequence (default 2048; 8k = 8192)"
    )
    g.add_argument("--grad-accum", type=_bounded("grad_accum"), default=d.grad_accum, help="gradient accumulation")
    g.add_argument("--rank", type=_bounded("rank"), default=d.rank, help="LoRA rank r (default 16)")
    g.add_argument("--alpha", type=_alpha, default=d.alpha, help="LoRA alpha (default 32)")
    g.add_argument(
        "--dropout", type=_ranged(Settings, "dropout"), default=d.dropout, help="LoRA dropout (default 0.05)"
    )
    g.add_argument(
        "--targets",
        default=d.targets,
        help="LoRA target modules: all-linear (default), attn, mlp, or a comma list (q_proj,v_proj)",
    )
    named("--quant", QUANT_TYPES, d.quant, "4-bit type for qlora (default nf4)")
    on_off("--double-quant", d.double_quant, "quantize the quantization constants again (default on)")
    named("--compute-dtype", DTYPES, d.compute_dtype, "compute dtype (default bf16)")
    named(
        "--optimizer",
        OPTIMIZERS,
        None,
        "TrainingArguments optim name (default paged_adamw_8bit for qlora, adamw_torch_fused for lora/full)",
    )
    on_off("--gradient-checkpointing", d.gradient_checkpointing, "recompute activations in backward (default on)")
    named("--attn", ATTN, d.attn, "attention implementation (default sdpa)")
    on_off(
        "--upcast-non-quantized",
        d.upcast_non_quantized,
        "qlora: cast embeddings, lm_head and norms to fp32 as peft's prepare_model_for_kbit_training does (default on)",
    )
    g.add_argument(
        "--alloc-conf",
        metavar="CONF",
        default=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        help="PyTorch's caching-allocator settings for the training process, as PYTORCH_CUDA_ALLOC_CONF takes them "
        "(e.g. expandable_segments:True); default: that variable here, else torch's defaults",
    )


def _add_calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="a calibration file written by `qlora-bench calibrate --out` (default: the one that ships with "
        "qlora-bench; also QLORA_BENCH_CALIBRATION)",
    )


def _use_calibration(a: argparse.Namespace) -> None:
    if getattr(a, "calibration", None):
        from .estimate.overhead import use_calibration

        use_calibration(a.calibration)


def settings_from_args(a: argparse.Namespace, method: str) -> Settings:
    if method != "qlora" and a.quant != "nf4" and a.method != "all":
        raise InputError(f"--quant {a.quant} applies only to --method qlora (got --method {method})")
    alpha = a.alpha
    return Settings(
        method=method,
        quant=a.quant if method == "qlora" else "nf4",
        double_quant=a.double_quant,
        compute_dtype=a.compute_dtype,
        rank=a.rank,
        alpha=alpha,
        dropout=a.dropout,
        targets=a.targets,
        optimizer=a.optimizer or DEFAULT_OPTIMIZER[method],
        gradient_checkpointing=a.gradient_checkpointing,
        batch=a.batch,
        seq=a.seq,
        grad_accum=a.grad_accum,
        attn=a.attn,
        upcast_non_quantized=a.upcast_non_quantized,
        alloc_conf=a.alloc_conf,
    ).validated("command line")


# ---- commands --------------------------------------------------------------------------------------------
def cmd_plan(a: argparse.Namespace) -> int:
    from .plan import plan
    from .profiles import resolve_gpu, resolve_model

    _use_calibration(a)
    _read_trainer_config(a)
    model = resolve_model(a.model)
    many = _gpu_list(a.gpu)
    if many is not None:
        return _plan_gpus(a, model, many)
    gpu = resolve_gpu(a.gpu)
    if a.fastest:
        return _plan_fastest(a, model, gpu)
    methods = ["full", "lora", "qlora"] if a.method == "all" else [a.method]
    traced = None
    if a.trace:
        _need_train_extra()
        from .trace import trace

        def traced(spec, s):
            return trace(spec, s, steps=a.trace_steps)

    plans = [
        plan(model, settings_from_args(a, m), gpu, a.epoch_tokens, traced=traced, epochs=a.epochs, price=a.price)
        for m in methods
    ]
    if a.json:
        out = [p.to_dict() for p in plans]
        if a.trainer_config:
            out = [{**d, "trainer_config": a.trainer_config.to_dict()} for d in out]
        print(_json(out if a.method == "all" else out[0]))
        return 0
    from . import render

    if a.method == "all":
        render.plans_side_by_side(plans)
    else:
        render.plan(plans[0])
    return 0


def _read_trainer_config(a: argparse.Namespace) -> None:
    """--config FILE: the trainer config's settings into `a`, except those the command line gives (flags win)."""
    if not a.config:
        if a.model is None:
            raise InputError("plan needs --model (a profile, config.json or hub id) or --config (a trainer's config)")
        return
    from . import render
    from .profiles import model_for_trainer
    from .trainer_config import read

    tc = read(a.config)
    given = a.given_flags
    for fld, message in tc.missing.items():
        if fld not in given:
            raise InputError(message)
    tc.settings(Settings(), given)  # the file's values checked, in the file's words, before any flag joins them
    for k, v in tc.values.items():
        if k not in given:
            setattr(a, k, v)
    if a.model:
        note = f"--model {a.model} (the command line; the file names {tc.model or 'none'})"
    elif tc.model:
        a.model, note = model_for_trainer(tc.model)
    else:
        raise InputError(
            f"{a.config}: names no base model ({TRAINER_MODEL_KEYS[tc.tool]}); give --model (a profile, "
            "config.json or hub id)"
        )
    a.trainer_config = tc
    if not a.json:
        render.trainer_config(tc, note, {k: getattr(a, k) for k in given & set(tc.values)})


# the key that names the base model, per trainer (for the message when a file has none)
TRAINER_MODEL_KEYS = {
    "axolotl": "base_model",
    "trl": "model_name_or_path",
    "llama-factory": "model_name_or_path",
    "transformers": "a TrainingArguments file never does",
}


def _gpu_list(text: str):
    """`all` or a comma list -> GPU specs (None for one GPU)."""
    from .profiles import gpu_names, resolve_gpu

    if text.strip().lower() == "all":
        return [resolve_gpu(g) for g in gpu_names()]
    if "," in text:
        names = [t for t in (x.strip() for x in text.split(",")) if t]
        if not names:
            raise InputError(f"--gpu {text!r}: name GPUs separated by commas, e.g. h100,a100,rtx-4090")
        gpus = {}
        for n in names:  # one row per card, however often it is named
            g = resolve_gpu(n)
            gpus.setdefault((g.name, g.count), g)
        return list(gpus.values())
    return None


def _plan_one_method(a: argparse.Namespace, what: str) -> str:
    if a.method == "all":
        raise InputError(f"{what} plans one method: give --method qlora, lora or full")
    return a.method


def _plan_gpus(a: argparse.Namespace, model, gpus) -> int:
    from .plan import rank_gpus

    if a.trace or a.fastest:
        raise InputError("--gpu all (or a list) ranks cards with the estimator: drop --trace / --fastest")
    s = settings_from_args(a, _plan_one_method(a, "--gpu all"))
    if s.compute_dtype == "fp32":
        raise InputError(
            "--gpu all ranks cards by predicted time, which is not predicted for fp32 compute (the GPU profiles "
            "carry 16-bit peaks): use --compute-dtype bf16 or fp16"
        )
    options = rank_gpus(model, s, gpus, a.epoch_tokens, epochs=a.epochs, price=a.price)
    return _print_options(a, options, lambda r: r.gpu_ranking(model, s, options, a.epoch_tokens, a.epochs))


def _plan_fastest(a: argparse.Namespace, model, gpu) -> int:
    from .plan import fastest

    if a.trace:
        raise InputError("--fastest searches with the estimator: drop --trace")
    s = settings_from_args(a, _plan_one_method(a, "--fastest"))
    options = fastest(model, s, gpu, a.epoch_tokens, epochs=a.epochs, price=a.price)
    return _print_options(a, options, lambda r: r.fastest(model, options))


def _print_options(a: argparse.Namespace, options: list, show) -> int:
    """JSON (a list of options) or the human table `show(render)` draws."""
    if a.json:
        print(_json([o.to_dict() for o in options]))
        return 0
    from . import render

    show(render)
    return 0


def cmd_infer(a: argparse.Namespace) -> int:
    from .estimate.inference import InferSettings
    from .profiles import resolve_gpu, resolve_model

    _use_calibration(a)
    model, gpu = resolve_model(a.model), resolve_gpu(a.gpu)
    s = Settings(rank=a.rank, alpha=a.alpha, targets=a.targets).validated("command line")
    if a.context < a.prompt:
        raise InputError(f"--context {a.context} must hold the prompt ({a.prompt} tokens) and what is generated")
    from .plan import infer_plan

    out = infer_plan(
        model, s, gpu, InferSettings(batch=a.batch, context=a.context, prompt=a.prompt, adapters=a.adapters)
    )
    if a.json:
        print(_json(out))
        return 0
    from . import render

    render.inference(out)
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    _need_train_extra()
    from .errors import check_output_dir, file_kind
    from .run.merge import merge_adapter

    if file_kind(Path(a.adapter) / "adapter_config.json"):
        raise InputError(
            f"--adapter {a.adapter}: no adapter_config.json there (a folder saved by peft's save_pretrained)"
        )
    if file_kind(a.base) != "missing" and file_kind(Path(a.base) / "config.json"):
        raise InputError(f"--base {a.base}: no config.json there (a model folder saved by transformers)")
    check_output_dir(a.out, "output folder for the merged model")
    try:
        info = merge_adapter(a.base, a.adapter, a.out, device=a.device, dtype=a.dtype)
    except (OSError, ValueError) as e:  # what transformers / peft say about a base or adapter they cannot load
        raise InputError(f"merge: {' '.join(str(e).split())[:300]}") from None
    print(
        f"merged into {info['out']}: {info['params']:,} parameters, {info['bytes'] / 1e9:.2f} GB in "
        f"{', '.join(info['files'])}; reloads with transformers alone"
    )
    return 0


def cmd_infer_bench(a: argparse.Namespace) -> int:
    _need_train_extra()
    import tempfile

    from .results import append_record
    from .run.infer import INFER_MODES, InferBenchConfig
    from .run.sweep import run_one

    modes = a.modes or list(INFER_MODES)
    unknown = [m for m in modes if m not in INFER_MODES]
    if unknown:
        raise InputError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(INFER_MODES)}")
    from .profiles import resolve_model

    spec = resolve_model(a.model)
    s = Settings(rank=a.rank, alpha=a.alpha, targets=a.targets).validated()
    from .errors import check_output_file

    out = check_output_file(Path(a.out) if a.out else Path("results") / gpu_slug() / "infer.jsonl", "results file")
    configs = [
        InferBenchConfig(
            a.model,
            mode,
            s,
            batch=a.batch,
            prompt=a.prompt,
            new_tokens=a.new_tokens,
            adapters=a.adapters,
            repeats=a.repeats,
        )
        for mode in modes
    ]
    if not a.yes:  # without a GPU: refuse modes that would not fit in RAM or take ages on the CPU
        from .run.preflight import check_cpu, infer_cost

        costs = [(infer_cost(spec, c), f"{spec.name} ({c.mode})") for c in configs]
        check_cpu("infer-bench", costs, knob="--prompt")
    from .run.progress import phases

    recs = []
    with tempfile.TemporaryDirectory(prefix="qlora-bench-infer-") as tmp, phases() as say:
        for i, cfg in enumerate(configs, 1):
            say(f"infer-bench {spec.name}: mode {i}/{len(configs)} {cfg.mode} (a fresh process)")
            rec = run_one(cfg, a.timeout, Path(tmp))
            append_record(out, rec)
            recs.append(rec)
    from . import render

    render.infer_records(recs, spec)
    print(f"appended {len(recs)} records to {out}")
    return 0 if all(r["outcome"] in ("ok", "oom") for r in recs) else 1  # like run: an error is exit 1


def cmd_profiles(a: argparse.Namespace) -> int:
    from . import render

    if a.json:
        from .profiles import gpu_names, gpu_profile, load_model_profile, model_names, model_profile, resolve_gpu

        out = {
            "models": [
                {
                    "name": n,
                    "aliases": model_profile(n).aliases,
                    "hf_id": model_profile(n).hf_id,
                    "params": load_model_profile(n).total_params,
                    "source": load_model_profile(n).source,
                }
                for n in model_names()
            ],
            "gpus": [
                {
                    "name": n,
                    "aliases": gpu_profile(n).aliases,
                    "memory_total_bytes": resolve_gpu(n).memory_total_bytes,
                    "launch_year": gpu_profile(n).launch_year,
                }
                for n in gpu_names()
            ],
        }
        print(_json(out))
        return 0
    render.profiles()
    return 0


def cmd_import_shared(a: argparse.Namespace) -> int:
    from .results import import_shared

    for dest, n in import_shared(Path(a.source), Path(a.out)).items():
        print(f"imported {n} records into {dest}")
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from .calibration import calibrate
    from .results import default_results_dir
    from .units import fmt_gib

    results = Path(a.results) if a.results else default_results_dir()
    cal = calibrate(results, Path(a.out))
    err = cal["allocated_rel_error"]
    print(f"fitted on {len(cal['fitted_on'])} records from {', '.join(cal['source_files'])}")
    for key in ("driver_idle_bytes", "cuda_context_bytes", "bnb_runtime_bytes", "cublas_workspace_bytes"):
        v = cal[key]
        print(
            f"  {key:24s} {fmt_gib(v['value'], 3)}  (n={v['n']}, range {fmt_gib(v['min'], 3)}..{fmt_gib(v['max'], 3)})"
        )
    rr = cal["reserved_rel_error"]
    print(f"  simulated allocated peak: median error {err['median']:.2%}, worst {err['max']:.2%}")
    print(f"  simulated reserved peak: worst under-prediction {rr['under']:.2%}, over-prediction {rr['over']:.2%}")
    margins = ", ".join(f"{k} {v:.2%}" for k, v in sorted(cal["safety_margin"].items()))
    print(f"  safety margins (largest held-out device under-prediction): {margins}")
    print(f"wrote {a.out}; plan with it: qlora-bench plan --calibration {a.out} ...")
    return 0


def _need_train_extra() -> None:
    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"this command needs {', '.join(missing)}: pip install 'qlora-bench[train]' "
            "(install torch first for your platform)"
        )


def _run_options(a: argparse.Namespace):
    from .run.train import RunOptions

    return RunOptions(
        steps=a.steps,
        warmup=a.warmup,
        seed=a.seed,
        min_seconds=a.min_seconds,
        text=getattr(a, "text", None),
        tokenizer=getattr(a, "tokenizer", None),
    )


def cmd_run(a: argparse.Namespace) -> int:
    _need_train_extra()
    from dataclasses import replace

    from .errors import check_output_file, file_kind, read_text
    from .profiles import resolve_model
    from .results import append_record
    from .run.config import RunConfig
    from .run.train import run_config

    spec = resolve_model(a.model)
    if bool(a.text) != bool(a.tokenizer):
        raise InputError("--text and --tokenizer go together: a text file and a local tokenizer folder")
    if a.text:  # checked before anything runs: a bad file is bad input, not a failed measurement
        read_text(a.text, "text file (--text)")
        if file_kind(a.tokenizer) != "a folder":
            raise InputError(f"--tokenizer {a.tokenizer}: expected a local tokenizer folder (tokenizer.json, ...)")
    trainers = ["loop", "sft"] if a.trainer == "both" else [a.trainer]
    if "sft" in trainers:
        import importlib.util

        if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
            raise InputError("--trainer sft needs trl: pip install 'qlora-bench[train]'")
    out = check_output_file(Path(a.out) if a.out else Path("results") / gpu_slug() / "runs.jsonl", "results file")
    settings = settings_from_args(a, a.method)
    if not a.yes:  # without a GPU: refuse a run that would not fit in RAM or take ages on the CPU
        from .run.preflight import check_cpu, train_cost

        check_cpu("run", [(train_cost(spec, settings, (a.warmup + a.steps) * len(trainers)), spec.name)])
    from .run.progress import phases

    worst, records = 0, []
    for trainer in trainers:
        cfg = RunConfig(a.model, settings, replace(_run_options(a), trainer=trainer))
        with phases(enabled=not a.json) as say:  # on stderr; stdout stays pure JSON with --json
            record = run_config(spec, cfg.settings, cfg.options, cfg.id, progress=say)
        record["key"] = cfg.key
        append_record(out, record)
        records.append(record)
        if not a.json:
            from . import render

            render.run_record(record, spec)
            print(f"appended to {out}")
        worst = max(worst, 0 if record["outcome"] in ("ok", "oom") else 1)
    if a.json:  # one JSON document: the record, or a list of both with --trainer both
        print(json.dumps(records if len(records) > 1 else records[0], indent=2, sort_keys=True, allow_nan=False))
    return worst


_bounded_jobs = flags.count(1, 64)


def cmd_crosscheck(a: argparse.Namespace) -> int:
    _need_train_extra()
    from . import crosscheck
    from .errors import check_output_file

    default = f"results/crosscheck/{'grid' if a.grid == 'full' else a.grid}.json"
    out = check_output_file(a.out or default, "crosscheck output (--out)")
    cases = crosscheck.grid(a.grid)

    def progress(row: dict) -> None:
        if row.get("trace"):
            print(f"{row['case']}: allocated {row['allocated_diff']:+.2%}, reserved {row['reserved_diff']:+.2%}")
        else:
            print(f"{row['case']}: not traced ({row['error']})")

    rows = crosscheck.run(cases, out, jobs=a.jobs, progress=progress, grid_name=a.grid)
    s = crosscheck.summary(rows)
    print(
        f"{s.get('traced', 0)}/{s['n']} traced; within targets: {s.get('within_targets', 0)}; "
        f"wrote {out} and {Path(out).with_suffix('.md')}"
    )
    return 0


def cmd_trace(a: argparse.Namespace) -> int:
    _need_train_extra()
    from .errors import check_output_file
    from .profiles import resolve_model

    _use_calibration(a)
    spec = resolve_model(a.model)
    settings = settings_from_args(a, a.method)
    plot = check_output_file(a.plot, "plot (--plot)") if a.plot else None
    events = check_output_file(a.events, "events file (--events)") if a.events else None
    if plot:
        from .trace.plot import need_matplotlib

        need_matplotlib()  # before minutes of tracing, not after
    from .trace import TraceFailed, trace

    try:
        result = trace(spec, settings, steps=a.steps, events_path=events)
    except TraceFailed as e:
        print(f"qlora-bench: trace failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if plot:
        from .trace.plot import plot_memory

        plot_memory(result, plot)
    if a.json:
        print(_json(result.to_dict()))
        return 0
    from .trace.report import render

    render(result, spec)
    if plot:
        print(f"plot written to {plot}")
    if events:
        print(f"events written to {events}")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    _need_train_extra()
    from .run import sweep as sw

    if a.file:
        sweep = sw.load_sweep(a.file)
    else:
        grid = {
            k: v
            for k, v in {
                "model": a.model,
                "method": a.method,
                "batch": a.batch,
                "seq": a.seq,
                "rank": a.rank,
                "optimizer": a.optimizer,
                "gradient_checkpointing": a.gradient_checkpointing,
                "double_quant": a.double_quant,
                "attn": a.attn,
            }.items()
            if v
        }
        if "model" not in grid:
            raise InputError("give a sweep file or at least --model (comma lists: --model 1b,8b --method lora,qlora)")
        data = {
            "name": a.name,
            "grid": [grid],
            "timeout_s": a.timeout or 1800,
            "options": {"steps": a.steps, "warmup": a.warmup, "seed": a.seed, "min_seconds": a.min_seconds},
        }
        sweep = sw.from_mapping(data, "command line")
    if a.timeout and a.file:
        sweep.timeout_s = a.timeout
    shard_spec = a.shard
    from .errors import check_output_file

    out = Path(a.out) if a.out else Path("results") / gpu_slug() / f"{sweep.name}.jsonl"
    if a.dry_run:
        configs = sw.shard(sweep.configs, *shard_spec) if shard_spec else sweep.configs
        for c in configs:
            print(c.id)
        print(f"{len(configs)} configurations -> {out}")
        return 0
    check_output_file(out, "results file")
    summary = sw.run_sweep(sweep, out, shard_spec, progress=not a.no_progress, cpu_check=not a.yes)
    from . import render

    render.sweep_summary(summary, out)
    return 0


def cmd_results(a: argparse.Namespace) -> int:
    from .results import load_records, merge

    if a.merge:
        n = merge([Path(p) for p in a.paths], Path(a.merge))
        print(f"merged {n} records into {a.merge}")
        return 0
    records = [r for p in a.paths for r in load_records(p, kind="train")]
    if a.json:
        print(json.dumps([r.data for r in records], indent=2, sort_keys=True, allow_nan=False))
        return 0
    from . import render

    render.results_table(records)
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from .results import default_results_dir, load_records
    from .validate import validate

    _use_calibration(a)
    paths = a.paths or [str(default_results_dir())]
    records = [r for p in paths for r in load_records(p, kind="train")]
    rows, summaries = validate(records)
    if not rows:
        raise InputError(f"no GPU records to validate in {', '.join(paths)} (records of runs on a GPU, or OOMs)")
    if a.json:
        from .estimate.overhead import overheads

        ov = overheads()
        out = {
            "rows": [x.to_dict() for x in rows],
            "summary": {k: v.to_dict() for k, v in summaries.items()},
            "safety_margin": ov.safety_margin,
            "reserved_band": {"under": ov.reserved_error_under, "over": ov.reserved_error_over},
        }
        print(json.dumps(out, indent=2, sort_keys=True, allow_nan=False))
        return 0
    from . import render

    if not a.paths:
        render.note(f"records: {paths[0]} (give a results file or folder to validate others)")
    render.validation(rows, summaries)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("report needs matplotlib: pip install 'qlora-bench[report]'")
    from .errors import check_output_dir
    from .report import build_report
    from .results import default_results_dir

    _use_calibration(a)
    out = check_output_dir(a.out, "report folder")
    written = build_report([Path(p) for p in a.paths or [default_results_dir()]], out)
    for p in written:
        print(f"wrote {p}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import compare, load_side

    cmp = compare(
        load_side(Path(a.new)),
        load_side(Path(a.baseline)),
        Tolerances(memory=a.memory_tolerance, throughput=a.throughput_tolerance),
        allow_missing=a.allow_missing,
    )
    if a.json:
        print(json.dumps(cmp.to_dict(), indent=2, sort_keys=True, allow_nan=False))
    else:
        from . import render

        render.comparison(cmp)
    return 1 if cmp.failed else 0


def cmd_baseline(a: argparse.Namespace) -> int:
    from .compare import update_baseline

    dest = update_baseline(Path(a.results), Path(a.out) if a.out else None, allow_dirty=a.allow_dirty)
    print(f"wrote {dest}")
    return 0


def _list(kind):
    """A comma list for a sweep grid: `--batch 1,2,4`, `--gradient-checkpointing on,off`; each item parsed by
    `kind` (a flag parser, bool, or str)."""

    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
        if kind is bool:
            table = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}
            try:
                return [table[x.lower()] for x in items]
            except KeyError:
                raise argparse.ArgumentTypeError(f"expected on/off values, got {text!r}") from None
        return [kind(x) for x in items]  # flag parsers raise ArgumentTypeError with what would be right

    return parse


def _add_run_options(p: argparse.ArgumentParser, with_trainer: bool = False) -> None:
    from .run.train import RunOptions

    d = RunOptions()
    g = p.add_argument_group("run options")

    def bounded(name: str):
        r = field_rule(RunOptions, name)
        return flags.count(int(r.ge), int(r.le))

    g.add_argument(
        "--steps", type=bounded("steps"), default=d.steps, help="timed optimizer steps, at least (default 5)"
    )
    g.add_argument("--warmup", type=bounded("warmup"), default=d.warmup, help="untimed warm-up steps (default 3)")
    g.add_argument("--seed", type=bounded("seed"), default=d.seed)
    g.add_argument(
        "--min-seconds",
        type=_ranged(RunOptions, "min_seconds"),
        default=d.min_seconds,
        help="keep timing until this many seconds have passed as well (default 0)",
    )
    if with_trainer:
        g.add_argument(
            "--trainer",
            choices=["loop", "sft", "both"],
            default=d.trainer,
            help="loop: the plain Trainer-equivalent loop (default); sft: trl's SFTTrainer; both: two records",
        )
        g.add_argument("--text", help="train on this text file instead of random token ids (needs --tokenizer)")
        g.add_argument("--tokenizer", help="a local tokenizer folder for --text")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(
        prog="qlora-bench",
        description="Will this fine-tune fit, what will it cost, which settings are "
        "fastest: VRAM planning checked against real runs.",
    )
    p.add_argument("--version", action="version", version=f"qlora-bench {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sp = sub.add_parser(
        "plan",
        help="feasibility verdict with a memory breakdown",
        description="Estimate peak GPU memory for a fine-tuning configuration and say whether it fits.",
    )
    sp.add_argument("--model", help=MODEL_HELP + " (required unless --config names one)")
    sp.add_argument(
        "--gpu",
        required=True,
        help="GPU profile (h100, rtx-4090), size (48gb, 24GiB, 2x24gb), or `all` / a comma list (h100,a100,"
        "rtx-4090) to rank cards by cost for the epoch",
    )
    sp.add_argument(
        "--config",
        metavar="FILE",
        help="a trainer's config file: Axolotl YAML, TRL `trl sft --config` YAML, LLaMA-Factory YAML, or a "
        "transformers TrainingArguments JSON; its settings replace the defaults, flags given here win",
    )
    add_settings_args(sp)
    sp.add_argument(
        "--epoch-tokens",
        type=flags.count(1, 10**15, flags.DECIMAL),
        default=100_000_000,
        help="tokens in one epoch of your data, for the predicted time per epoch (default 100M; 1.5B works)",
    )
    sp.add_argument(
        "--epochs", type=flags.number(0, 1e6, lo_open=True), default=1, help="epochs, for the cost (default 1)"
    )
    sp.add_argument(
        "--price",
        type=flags.number(0, 1e4, lo_open=True),
        help="US dollars per GPU-hour (default: the GPU profile's typical on-demand price, where it has one)",
    )
    sp.add_argument(
        "--fastest",
        action="store_true",
        help="search the settings that keep the model, method and global batch (micro-batch x accumulation, "
        "checkpointing, attention, paged optimizer) for the fastest that fits",
    )
    sp.add_argument(
        "--trace",
        action="store_true",
        help="answer with `qlora-bench trace` (the real libraries on fake CUDA tensors; train extra, seconds) "
        "instead of the estimator's step program; searches and suggestions still use the estimator",
    )
    sp.add_argument("--trace-steps", type=flags.count(1, 20), default=2, help="steps traced with --trace (default 2)")
    _add_calibration_arg(sp)
    sp.add_argument("--json", action="store_true", help="print JSON (a list for --method all)")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser(
        "run",
        help="real training steps of one configuration: peak memory and tokens/s",
        description="Train a random-weight model of a real architecture for a few steps and record "
        "peak memory (torch, NVML) and throughput. Needs the train extra.",
    )
    sp.add_argument("--model", required=True, help=MODEL_HELP)
    add_settings_args(sp, methods=METHODS)
    _add_run_options(sp, with_trainer=True)
    sp.add_argument("--out", help="results .jsonl to append to (default results/<gpu>/runs.jsonl)")
    sp.add_argument("--json", action="store_true", help="print the record as JSON")
    sp.add_argument("--yes", action="store_true", help=YES_HELP)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser(
        "trace",
        help="one real training step on fake CUDA tensors, every allocation replayed through an allocator model",
        description="Run the runner's training step on fake CUDA tensors (no GPU, no memory: every op computes "
        "shapes only), record every allocation and free, and replay them through a model of PyTorch's CUDA caching "
        "allocator: peak allocated, reserved and device memory by category and phase. Needs the train extra and a "
        "C++ compiler (a small shim is built once per torch version).",
    )
    sp.add_argument("--model", required=True, help=MODEL_HELP)
    add_settings_args(sp, methods=METHODS)
    sp.add_argument("--steps", type=flags.count(1, 20), default=3, help="optimizer steps to trace (default 3)")
    sp.add_argument("--plot", metavar="PNG", help="write a memory-over-time plot (needs matplotlib)")
    sp.add_argument("--events", metavar="FILE", help="write the allocation events (JSON lines; gzip if .gz)")
    _add_calibration_arg(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_trace)

    sp = sub.add_parser(
        "sweep",
        help="run a grid of configurations, each in a fresh process (resumable)",
        description="Run a sweep file (YAML) or a grid given as comma lists. Each configuration runs "
        "in a fresh subprocess; results are appended as they finish; rerunning resumes.",
    )
    sp.add_argument("file", nargs="?", help="sweep YAML (see sweeps/)")
    sp.add_argument("--model", type=_list(str), help="comma list of models")
    sp.add_argument("--method", type=_list(str.lower), help="comma list: qlora,lora,full")
    sp.add_argument("--batch", type=_list(_bounded("batch")))
    sp.add_argument("--seq", type=_list(_bounded("seq", flags.BINARY)))
    sp.add_argument("--rank", type=_list(_bounded("rank")))
    sp.add_argument("--optimizer", type=_list(str.lower))
    sp.add_argument("--gradient-checkpointing", type=_list(bool), help="on,off")
    sp.add_argument("--double-quant", type=_list(bool), help="on,off")
    sp.add_argument("--attn", type=_list(str.lower))
    sp.add_argument("--name", default="cli-sweep", help="sweep name (output file name)")
    _add_run_options(sp)
    sp.add_argument(
        "--timeout",
        type=_timeout,
        default=None,
        help="seconds per configuration (default: the sweep file's timeout_s, else 1800)",
    )
    sp.add_argument("--shard", type=flags.shard, help="run every n-th configuration: i/n (1-based)")
    sp.add_argument("--out", help="results .jsonl (default results/<gpu>/<sweep name>.jsonl)")
    sp.add_argument("--dry-run", action="store_true", help="list the configurations and exit")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    sp.add_argument("--yes", action="store_true", help=YES_HELP)
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("results", help="a table of measured results; --merge joins files (e.g. shards)")
    sp.add_argument("paths", nargs="+", help="result .jsonl files or folders")
    sp.add_argument("--merge", metavar="OUT", help="write the joined records to OUT instead of printing")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_results)

    sp = sub.add_parser("validate", help="estimate vs measurement for result records, with errors and false fits")
    sp.add_argument(
        "paths",
        nargs="*",
        help="result .jsonl files or folders (default: ./results, else the measurements that come with qlora-bench)",
    )
    _add_calibration_arg(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser("report", help="Markdown + self-contained HTML report of estimates vs measurements")
    sp.add_argument(
        "paths", nargs="*", help="result files or folders (default: ./results, else the shipped measurements)"
    )
    sp.add_argument("-o", "--out", default="report", help="output folder (default report/)")
    _add_calibration_arg(sp)
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("compare", help="compare results with a baseline: exit 1 on a memory or throughput regression")
    sp.add_argument("new", help="new results (.jsonl file or folder) or a baseline .json")
    sp.add_argument("baseline", help="baseline .json (results/baselines/<gpu>.json) or results to compare with")
    sp.add_argument(
        "--memory-tolerance",
        type=_ranged(Tolerances, "memory"),
        default=0.02,
        help="allowed growth of a peak, a fraction in [0, 1) (default 0.02)",
    )
    sp.add_argument(
        "--throughput-tolerance",
        type=_ranged(Tolerances, "throughput"),
        default=0.05,
        help="allowed drop of tokens/s beyond the measured spread (default 0.05)",
    )
    sp.add_argument("--allow-missing", action="store_true", help="configurations missing from the new results pass")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("baseline", help="baselines for regression checks")
    bsub = sp.add_subparsers(dest="baseline_command", required=True, parser_class=_Parser)
    bp = bsub.add_parser("update", help="write results/baselines/<gpu>.json from results (clean tree only)")
    bp.add_argument("results", help="result .jsonl file or folder of one GPU model")
    bp.add_argument("--out", help="destination (default results/baselines/<gpu>.json in this folder)")
    bp.add_argument("--allow-dirty", action="store_true", help="allow uncommitted changes (records commit-dirty)")
    bp.set_defaults(func=cmd_baseline)

    sp = sub.add_parser(
        "infer",
        help="inference memory after fine-tuning: 16-bit, 4-bit + adapters, merged; merge",
        description="Serving memory of the four deployment modes (16-bit base, 4-bit base with N "
        "unmerged adapters, merged 16-bit, merged re-quantized to 4-bit) with the KV "
        "cache, the memory of the merge itself, and the adapter's size.",
    )
    sp.add_argument("--model", required=True, help=MODEL_HELP)
    sp.add_argument("--gpu", required=True, help="GPU profile (h100, rtx-4090) or size (48gb, 24GiB)")
    sp.add_argument("--batch", type=_bounded("batch"), default=1, help="concurrent sequences (default 1)")
    sp.add_argument(
        "--context", type=_bounded("seq", flags.BINARY), default=4096, help="tokens per sequence in the KV cache"
    )
    sp.add_argument(
        "--prompt", type=_bounded("seq", flags.BINARY), default=2048, help="tokens in one prefill (default 2048)"
    )
    sp.add_argument("--adapters", type=flags.count(1, 4096), default=1, help="adapters loaded at once (default 1)")
    sp.add_argument("--rank", type=_bounded("rank"), default=16)
    sp.add_argument("--alpha", type=_alpha, default=32)
    sp.add_argument("--targets", default="all-linear")
    _add_calibration_arg(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_infer)

    sp = sub.add_parser(
        "merge",
        help="merge a LoRA/QLoRA adapter into its 16-bit base and save safetensors",
        description="Load the base in 16-bit, apply the adapter, merge_and_unload, save as "
        "safetensors and reload with plain transformers.",
    )
    sp.add_argument("--base", required=True, help="base model folder (or hub id when online)")
    sp.add_argument("--adapter", required=True, help="adapter folder saved by peft (adapter_config.json)")
    sp.add_argument("--out", required=True, help="output folder for the merged model")
    sp.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu (default) or cuda: see `qlora-bench infer` for the peak",
    )
    sp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    sp.set_defaults(func=cmd_merge)

    sp = sub.add_parser(
        "infer-bench",
        help="measure serving: memory, prefill, decode tokens/s, adapter switching",
        description="Measure the serving modes on a random-weight model, each in a fresh process: "
        "base16, adapters4, merged16, merged4 and switch (N adapters, set_adapter).",
    )
    sp.add_argument("--model", required=True, help=MODEL_HELP)
    sp.add_argument(
        "--modes", type=_list(str.lower), help="comma list (default all: base16,adapters4,merged16,merged4,switch)"
    )
    sp.add_argument("--batch", type=_bounded("batch"), default=8, help="the larger decode batch (1 is always measured)")
    sp.add_argument("--prompt", type=_bounded("seq", flags.BINARY), default=512, help="prompt tokens (prefill)")
    sp.add_argument(
        "--new-tokens", type=_bounded("seq", flags.BINARY), default=32, help="generated tokens per sequence"
    )
    sp.add_argument("--adapters", type=flags.count(1, 4096), default=4, help="adapters for the switch mode")
    sp.add_argument("--repeats", type=flags.count(1, 1000), default=3, help="timings per measurement (median)")
    sp.add_argument("--rank", type=_bounded("rank"), default=16)
    sp.add_argument("--alpha", type=_alpha, default=32)
    sp.add_argument("--targets", default="all-linear")
    sp.add_argument("--timeout", type=_timeout, default=1800.0, help="seconds per mode")
    sp.add_argument("--out", help="results .jsonl (default results/<gpu>/infer.jsonl)")
    sp.add_argument("--yes", action="store_true", help=YES_HELP)
    sp.set_defaults(func=cmd_infer_bench)

    sp = sub.add_parser("profiles", help="list the built-in models and GPUs")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_profiles)

    sp = sub.add_parser(
        "crosscheck",
        help="the analytic estimator against `trace` on a grid of configurations (CPU, no GPU; train extra)",
    )
    sp.add_argument(
        "--grid",
        type=flags.choice(("smoke", "full", "records")),
        default="smoke",
        help="smoke (4 cases), full (220) or records (the committed GPU records' configurations, with their "
        "measurements)",
    )
    sp.add_argument(
        "--out",
        help="rows (one JSON document), a .md summary beside it (default results/crosscheck/<grid>.json; "
        "full: grid.json)",
    )
    sp.add_argument("--jobs", type=_bounded_jobs, default=1, help="traces at once (each is a process)")
    sp.set_defaults(func=cmd_crosscheck)

    sp = sub.add_parser("import-shared", help="import shared/measurements into results/ with provenance")
    sp.add_argument("source", help="folder (or .jsonl file) of shared measurements, e.g. ../shared/measurements")
    sp.add_argument(
        "--out",
        default="results/h100",
        help="destination folder (default results/h100): <name>-shared.jsonl per measurement file",
    )
    sp.set_defaults(func=cmd_import_shared)

    sp = sub.add_parser(
        "calibrate",
        help="fit the overhead and throughput constants from measured results into a calibration file",
        description="Fit the constants no formula gives (CUDA context, allocator slack, safety margins, step-time "
        "coefficients) from GPU records, and write them to --out; use the file with --calibration.",
    )
    sp.add_argument(
        "results", nargs="?", help="result .jsonl file or folder (default: ./results, else the shipped measurements)"
    )
    sp.add_argument("--out", default="calibration.json", help="calibration file to write (default calibration.json)")
    sp.set_defaults(func=cmd_calibrate)
    return p


INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h): a bug in qlora-bench, not bad input


def _given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags `argv` gives for the `plan` subcommand (parsed again into a namespace that
    already has every destination, so argparse fills in no defaults: what changed was given)."""
    unset = object()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["plan"]
    ns = argparse.Namespace(**{a.dest: unset for a in sub._actions if a.dest != "help"})
    sub.parse_known_args(argv[argv.index("plan") + 1 :], ns)
    return {k for k, v in vars(ns).items() if v is not unset}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.func is cmd_plan:
        args.given_flags = _given_flags(parser, argv) if args.config else set()
        args.trainer_config = None
    try:
        return args.func(args)
    except InputError as e:
        message = " ".join(str(e).split())  # one line, whatever a message quoted
        print(f"qlora-bench: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # piped into head: the reader stopped reading
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush stays quiet
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        print("qlora-bench: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line for the user, the traceback on request
        if os.environ.get("QLORA_BENCH_DEBUG"):
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        print(
            f"qlora-bench: internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
            f"(at {Path(where.filename).name}:{where.lineno}); please report it, with QLORA_BENCH_DEBUG=1 for the "
            "traceback",
            file=sys.stderr,
        )
        return INTERNAL_ERROR
    finally:
        if getattr(args, "calibration", None):  # main() may run again in this process (tests): back to the default
            from .estimate.overhead import use_calibration

            use_calibration(None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
