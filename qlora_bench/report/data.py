"""The report's tables, as plain rows (lists of dicts), computed from records, validation and the estimator."""

from __future__ import annotations

import statistics

from ..estimate import estimate
from ..estimate.overhead import overheads
from ..plan import fits_with_margin, max_batch, usable_bytes
from ..profiles import resolve_gpu, resolve_model
from ..results import Record
from ..settings import DEFAULT_OPTIMIZER, Settings
from ..units import GiB
from ..validate import validate

FEASIBILITY_MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-2-13b", "qwen2.5-32b", "llama-3.1-70b")
FEASIBILITY_GPUS = ("t4", "rtx-4090", "rtx-a6000", "a100-80gb", "h200")
METHODS = ("full", "lora", "qlora")


def gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def error_table(rows) -> list[dict]:
    out = []
    for x in sorted(rows, key=lambda r: r.record.id):
        m, tp = x.measured, x.throughput
        out.append(
            {
                "configuration": x.record.id,
                "set": "held-out" if x.held_out else "fitted",
                "allocated GiB": gib(m["peak_allocated_bytes"]),
                "allocated err": pct(x.error("peak_allocated_bytes")),
                "device GiB": gib(m["peak_device_bytes"]),
                "predicted GiB": gib(x.predicted["peak_device_bytes"]),
                "device err": pct(x.error("peak_device_bytes")),
                "static err": pct(x.error("static_after_load_bytes")),
                "tokens/s": f"{tp['tokens_per_sec']:,.0f}" if tp.get("tokens_per_sec") else "-",
                "predicted tokens/s": f"{tp['tokens_per_sec_predicted']:,.0f}"
                if tp.get("tokens_per_sec_predicted")
                else "-",
                "MFU": f"{tp['mfu']:.1%}" if tp.get("mfu") is not None else "-",
                "HFU": f"{tp['hfu']:.1%}" if tp.get("hfu") is not None else "-",
            }
        )
    return out


def summary_table(summaries) -> list[dict]:
    out = []
    for name, s in summaries.items():
        if not s.n:
            continue
        med, worst = s.median_abs_error, s.worst_abs_error
        out.append(
            {
                "records": name,
                "n": str(s.n_memory),
                "n tokens/s": str(s.n_throughput),
                "device median": f"{med.get('peak_device_bytes', 0):.1%}",
                "device worst": f"{worst.get('peak_device_bytes', 0):.1%}",
                "allocated median": f"{med.get('peak_allocated_bytes', 0):.1%}",
                "allocated worst": f"{worst.get('peak_allocated_bytes', 0):.1%}",
                "false fits": str(s.false_fits),
                "tokens/s median": f"{med['tokens_per_sec']:.1%}" if "tokens_per_sec" in med else "-",
                "tokens/s worst": f"{worst['tokens_per_sec']:.1%}" if "tokens_per_sec" in worst else "-",
            }
        )
    return out


def feasibility_table() -> list[dict]:
    """Estimator only: for each model x GPU x method at 2048 tokens, the largest micro-batch that fits."""
    out = []
    for name in FEASIBILITY_MODELS:
        model = resolve_model(name)
        row = {"model": name, "params": f"{model.total_params / 1e9:.1f} B"}
        for g in FEASIBILITY_GPUS:
            gpu = resolve_gpu(g)
            cells, usable = [], usable_bytes(gpu)
            for method in METHODS:
                # plan's verdict and max_batch, without the suggestions and the sequence search it adds
                s = Settings(method=method, optimizer=DEFAULT_OPTIMIZER[method])
                e = estimate(model, s)
                fits = fits_with_margin(e, usable)
                cells.append(
                    f"{method[0].upper()}:{max_batch(model, s, usable, e)}" if fits else f"{method[0].upper()}:-"
                )
            row[g] = " ".join(cells)
        out.append(row)
    return out


def environment_table(records: list[Record]) -> list[dict]:
    """One row per results file, environment and origin. `source` is the file a record was imported from
    (provenance.source; "-" for records written by our own runner), `commit` the repository commit the run
    was made at (environment.git_commit), "-" where the record has none."""
    seen = {}
    for r in records:
        env = r.data.get("environment") or {}
        v = env.get("versions") or {}
        prov = r.data.get("provenance") or {}
        row = {
            "results file": str(r.path.name),
            "GPU": env.get("gpu_name") or "-",
            "driver": env.get("driver") or "-",
            "torch": v.get("torch") or "-",
            "transformers": v.get("transformers") or "-",
            "peft": v.get("peft") or "-",
            "bitsandbytes": v.get("bitsandbytes") or "-",
            "source": prov.get("source") or "-",
            "commit": env.get("git_commit") or "-",
        }
        seen.setdefault(tuple(row.values()), {**row, "records": 0})["records"] += 1
    return [{**d, "records": str(d["records"])} for _, d in sorted(seen.items())]


def calibration_table() -> list[dict]:
    ov = overheads()
    rows = [
        ("CUDA context + libraries", gib(ov.cuda_context) + " GiB"),
        ("bitsandbytes runtime", gib(ov.bnb_runtime) + " GiB"),
        ("cuBLAS workspace", gib(ov.cublas_workspace) + " GiB"),
        ("driver idle use", gib(ov.driver_idle) + " GiB"),
        (
            "allocator slack",
            "simulated (caching-allocator model); reserved peak off by at most "
            f"-{ov.reserved_error_under:.1%} / +{ov.reserved_error_over:.1%} on the records",
        ),
        (
            "safety margin per method (largest held-out under-prediction)",
            ", ".join(f"{k} {v:.1%}" for k, v in sorted(ov.safety_margin.items())),
        ),
        *_step_time_rows(ov),
        ("fitted on / held out", f"{len(ov.fitted_on)} records / the rest"),
    ]
    return [{"constant": k, "value": v} for k, v in rows]


def _step_time_rows(ov) -> list[tuple[str, str]]:
    """The step-time constants per GPU profile (estimate/steptime.py), with their out-of-sample error."""
    rows = []
    for gpu, fit in sorted(ov.step_time.items()):
        t = fit["theta"]
        loo = [abs(v) for v in fit.get("loo_rel_error", {}).values()]
        rows += [
            (
                f"step time on {gpu}: GEMM / attention / bandwidth efficiency",
                f"{t['e_mm']:.0%} / {t['e_attn']:.0%} / {t['e_bw']:.0%} of the datasheet peak",
            ),
            (
                f"step time on {gpu}: host per kernel (Python / autograd engine), per module call, shortest kernel",
                f"{t['c_py'] * 1e6:.1f} / {t['c_eng'] * 1e6:.1f} us, {t['c_mod'] * 1e6:.0f} us, "
                f"{t['t_min'] * 1e6:.1f} us",
            ),
            (
                f"step time on {gpu}: error left out (median / worst, {len(loo)} runs)",
                f"{statistics.median(loo):.1%} / {max(loo):.1%}" if loo else "-",
            ),
        ]
    return rows


def breakdown_series(rows) -> list[dict]:
    """Per measured configuration, estimated and measured memory in the same five stacks (GiB)."""
    out = []
    for x in sorted(rows, key=lambda r: r.record.id):
        e, m = x.estimate, x.record.measured
        ph = e.components
        static_e = sum(ph.get(k, 0) for k in ("weights_4bit", "quant_constants", "weights_dense", "lora_adapters"))
        opt_e = ph.get("optimizer_states", 0)
        static_m = (m.get("mem_after_load") or {}).get("allocated") or 0
        opt_m = (m.get("optimizer_state_bytes") or 0) - (m.get("optimizer_state_paged_bytes") or 0)
        out.append(
            {
                "label": x.record.id.replace("/adamw_torch_fused", "").replace("/paged_adamw_8bit", ""),
                "estimated": [
                    static_e,
                    opt_e,
                    e.peak_allocated_bytes - static_e - opt_e,
                    e.peak_reserved_bytes - e.peak_allocated_bytes,
                    e.peak_device_bytes - e.peak_reserved_bytes,
                ],
                "measured": [
                    static_m,
                    opt_m,
                    m["peak_allocated_bytes"] - static_m - opt_m,
                    m["peak_reserved_bytes"] - m["peak_allocated_bytes"],
                    m["peak_device_bytes"] - m["peak_reserved_bytes"],
                ],
            }
        )
    return out


def inference_table() -> list[dict]:
    """Estimator: serving memory of the four modes for Llama-3.1-8B (r=16 adapter) at batch 1 x 4096 tokens,
    with the merge's peak and path, on a 24 GB card and an H100."""
    from ..estimate.inference import MODE_LABELS, InferSettings
    from ..plan import infer_plan

    out = []
    for gpu_name in ("rtx-4090", "h100"):
        d = infer_plan(
            resolve_model("llama-3.1-8b"),
            Settings(),
            resolve_gpu(gpu_name),
            InferSettings(batch=1, context=4096, prompt=2048, adapters=1),
        )
        row = {"GPU": gpu_name}
        for m in d["modes"]:
            row[MODE_LABELS[m["mode"]]] = f"{m['peak_device_bytes'] / GiB:.2f} GiB, batch <= {m['max_batch']}"
        row["merge"] = f"{d['merge']['peak_bytes'] / GiB:.1f} GiB on the {d['merge']['path'].split()[0]}"
        out.append(row)
    return out


def infer_measured_table(infer_records: list[Record]) -> list[dict]:
    rows = []
    for r in sorted(infer_records, key=lambda r: r.id):
        m, sv = r.measured, r.data.get("serving") or {}
        b = sv.get("batch")
        rows.append(
            {
                "configuration": r.id,
                "peak GiB": gib(m.get("peak_allocated_bytes")),
                "prefill s (b1)": f"{m['prefill_seconds_b1']:.3f}" if m.get("prefill_seconds_b1") else "-",
                "decode tok/s (b1)": f"{m['decode_tokens_per_sec_b1']:,.1f}"
                if m.get("decode_tokens_per_sec_b1")
                else "-",
                f"decode tok/s (b{b})": f"{m[f'decode_tokens_per_sec_b{b}']:,.1f}"
                if m.get(f"decode_tokens_per_sec_b{b}")
                else "-",
            }
        )
    return rows


def collect(records: list[Record]) -> dict:
    rows, summaries = validate(records)
    ok_rows = [x for x in rows if x.record.ok]
    memory_rows = [x for x in ok_rows if x.has_memory]  # throughput-only records withhold their memory
    return {
        "rows": ok_rows,
        "memory_rows": memory_rows,
        "errors": error_table(memory_rows),
        "summary": summary_table(summaries),
        "feasibility": feasibility_table(),
        "environment": environment_table([x.record for x in ok_rows]),
        "calibration": calibration_table(),
        "breakdown": breakdown_series(memory_rows),
        "inference": inference_table(),
        "step_time": step_time_table(ok_rows),
        "step_time_band": step_time_band(),
    }


def step_time_band() -> float:
    """The worst leave-one-out step-time error over the GPU classes fitted (0 if none)."""
    fits = overheads().step_time.values()
    return max((abs(v) for f in fits for v in f.get("loo_rel_error", {}).values()), default=0.0)


def step_time_table(rows) -> list[dict]:
    """Per record with a measured step time: measured and predicted step, the error in sample and left out."""
    out = []
    for x in sorted(rows, key=lambda r: (r.record.model, r.record.id)):
        tp = x.throughput
        if not tp.get("tokens_per_sec_predicted"):
            continue
        out.append(
            {
                "configuration": x.record.id,
                "step s": f"{tp['step_seconds']:.3f}" if tp.get("step_seconds") else "-",
                "tokens/s": f"{tp['tokens_per_sec']:,.0f}",
                "predicted": f"{tp['tokens_per_sec_predicted']:,.0f}",
                "error": pct(tp.get("error")),
                "error left out": pct(tp.get("error_left_out")),
                "MFU": f"{tp['mfu']:.1%}" if tp.get("mfu") is not None else "-",
                "HFU": f"{tp['hfu']:.1%}" if tp.get("hfu") is not None else "-",
            }
        )
    return out
