"""What fine-tuning guides claim, checked against the committed measurements and the estimator.

Each claim gets a verdict (true / false / untested), the evidence, and where the evidence came from. Verdicts
are computed from records and estimates here, never typed in.
"""

from __future__ import annotations

import statistics

from ..estimate import estimate
from ..estimate.quantization import bits_per_param
from ..plan import max_seq, plan, required_bytes
from ..profiles import resolve_gpu, resolve_model
from ..results import Record
from ..settings import Settings
from ..units import GiB

GB = 1e9


def _find(records: list[Record], model: str, **settings) -> list[Record]:
    out = []
    for r in records:
        s = r.settings
        if r.model == model and r.ok and all(getattr(s, k) == v for k, v in settings.items()):
            out.append(r)
    return out


def claim_70b_48gb(records) -> dict:
    m, g = resolve_model("llama-3.1-70b"), resolve_gpu("48gb")
    up = plan(m, Settings(), g)
    no_up = plan(m, Settings(upcast_non_quantized=False), g)
    measured = _find(records, "llama-3.1-70b", method="qlora")
    verdict = "true" if up.fits else ("only without the fp32 upcast" if no_up.fits else "false")
    return {
        "claim": "70B QLoRA fits in 48 GB",
        "verdict": verdict + (" (estimate)" if not measured else ""),
        "evidence": (
            f"Llama-3.1-70B, r=16, 1x2048, paged 8-bit AdamW on 48 GiB: needs "
            f"{required_bytes(up.estimate) / GiB:.1f} GiB with peft's fp32 upcast of embeddings/lm_head, "
            f"{required_bytes(no_up.estimate) / GiB:.1f} GiB without it (longest sequence "
            f"{no_up.max_seq:,} tokens). No 70B run measured yet."
        ),
    }


def claim_8b_10_12gb(records) -> dict:
    recs = _find(records, "llama-3.1-8b", method="qlora", rank=16, double_quant=True, batch=1, seq=2048)
    m = resolve_model("llama-3.1-8b")
    longest = max_seq(m, Settings(), int(12 * GB))  # the longest step whose device peak stays within 12 GB
    if recs:
        dev = statistics.median(r.measured["peak_device_bytes"] for r in recs)
        verdict = "true" if dev <= 12 * GB else "false at 2048 tokens"
        ev = (
            f"measured on an H100: {dev / GB:.1f} GB device peak for Llama-3.1-8B QLoRA r=16, 1x2048 "
            f"({len(recs)} runs). The estimator keeps 8B QLoRA within 12 GB up to {longest:,} tokens per step."
        )
    else:
        verdict, ev = "untested", f"estimator: within 12 GB up to {longest:,} tokens per step"
    return {"claim": "8B QLoRA needs 10-12 GB", "verdict": verdict, "evidence": ev}


def claim_8b_base_nf4(records) -> dict:
    recs = _find(records, "llama-3.1-8b", method="qlora", double_quant=True)
    from ..estimate.weights import weight_bytes

    # as loaded, before peft's upcast: 4-bit linears + constants, 16-bit embeddings, lm_head and norms
    est = weight_bytes(resolve_model("llama-3.1-8b"), Settings(upcast_non_quantized=False)).total
    if recs:
        built = statistics.median(r.measured["mem_after_model_build"]["allocated"] for r in recs)
        verdict = "true" if abs(built / GB - 5.5) <= 0.5 else "false"
        ev = (
            f"measured: {built / GB:.2f} GB allocated after loading Llama-3.1-8B in NF4 + double quant (bf16 "
            f"embeddings and lm_head); estimator {est / GB:.2f} GB"
        )
    else:
        verdict, ev = "untested", f"estimator {est / GB:.2f} GB"
    return {"claim": "an 8B base in NF4 takes ~5.5 GB", "verdict": verdict, "evidence": ev}


def claim_double_quant(records) -> dict:
    n = 4096 * 4096
    saved = bits_per_param(n, 64, False) - bits_per_param(n, 64, True)
    dq = _find(records, "llama-3.1-8b", method="qlora", double_quant=True, batch=1, seq=2048)
    nodq = _find(records, "llama-3.1-8b", method="qlora", double_quant=False, batch=1, seq=2048)
    ev = f"bitsandbytes' own tensors: {saved:.3f} bit/param saved (4.500 -> {bits_per_param(n, 64, True):.3f})"
    if dq and nodq:
        q = estimate(resolve_model("llama-3.1-8b"), Settings()).phases["load"]
        qparams = q["weights_4bit"] * 2
        diff = statistics.median(r.measured["mem_after_model_build"]["allocated"] for r in nodq) - statistics.median(
            r.measured["mem_after_model_build"]["allocated"] for r in dq
        )
        ev += (
            f"; measured on the H100: {8 * diff / qparams:.3f} bit/param (the extra is the CUDA allocator "
            "rounding the per-tensor fp32 absmax blocks)"
        )
    return {
        "claim": "double quantization saves ~0.37 bit/param",
        "verdict": "true" if abs(saved - 0.37) < 0.01 else "false",
        "evidence": ev,
    }


def claim_qlora_slower(records) -> dict:
    parts, slow = [], []
    for model, b, s in (("llama-3.2-1b", 4, 1024), ("llama-3.1-8b", 1, 2048)):
        lo = _find(records, model, method="lora", batch=b, seq=s, gradient_checkpointing=True)
        q = _find(records, model, method="qlora", batch=b, seq=s, double_quant=True, gradient_checkpointing=True)
        if lo and q:
            tl = statistics.median(r.measured["tokens_per_sec"] for r in lo)
            tq = statistics.median(r.measured["tokens_per_sec"] for r in q)
            slow.append(1 - tq / tl)
            parts.append(f"{model} {b}x{s}: LoRA {tl:,.0f}, QLoRA {tq:,.0f} tokens/s ({1 - tq / tl:.0%} slower)")
    if not slow:
        return {"claim": "QLoRA trains 20-30% slower than LoRA", "verdict": "untested", "evidence": "no pair"}
    verdict = "true" if all(0.2 <= x <= 0.3 for x in slow) else "false"
    return {
        "claim": "QLoRA trains 20-30% slower than LoRA",
        "verdict": verdict + " (steps < 1 s)" if verdict == "false" else verdict,
        "evidence": "; ".join(parts) + " on an H100 (median of repeats; short steps vary up to 30 %)",
    }


def claim_3x_on_24gb(records) -> dict:
    m, g = resolve_model("llama-3.1-8b"), resolve_gpu("rtx-4090")
    lo = plan(m, Settings(method="lora", optimizer="adamw_torch_fused"), g)
    q = plan(m, Settings(), g)
    return {
        "claim": "QLoRA gives ~3x the throughput of LoRA on a 24 GB card",
        "verdict": "untested",
        "evidence": (
            f"no 24 GB card measured. Estimator, Llama-3.1-8B at 2048 tokens on an RTX 4090: largest "
            f"micro-batch LoRA {lo.max_batch}, QLoRA {q.max_batch}"
        ),
    }


def claim_nf4_symmetric() -> dict:
    try:
        import bitsandbytes.functional as F

        levels = [round(float(x), 4) for x in F.get_4bit_type("nf4", device="cpu")]
    except Exception:  # bitsandbytes not installed: the report says so
        return {
            "claim": "NF4's levels are symmetric around zero",
            "verdict": "untested",
            "evidence": "bitsandbytes is not installed where this report was built",
        }
    neg = sorted(-x for x in levels if x < 0)
    pos = sorted(x for x in levels if x > 0)
    symmetric = neg == pos
    return {
        "claim": "NF4's levels are symmetric around zero",
        "verdict": "true" if symmetric else "false",
        "evidence": (
            f"bitsandbytes get_4bit_type('nf4'): {len(neg)} negative and {len(pos)} positive levels "
            f"plus an exact 0: {', '.join(f'{x:g}' for x in levels)}"
        ),
    }


def _gpu_infer(infer_records: list[Record], mode: str) -> list[Record]:
    return [
        r
        for r in infer_records
        if r.ok and (r.data.get("serving") or {}).get("mode") == mode and r.measured.get("peak_device_bytes")
    ]


def claim_unmerged_latency(infer_records) -> dict:
    base, ad = _gpu_infer(infer_records, "base16"), _gpu_infer(infer_records, "adapters4")
    claim = "unmerged adapters add ~5-10% latency"
    if not (base and ad):
        return {
            "claim": claim,
            "verdict": "untested",
            "evidence": "no GPU infer-bench run committed yet (qlora-bench infer-bench measures it)",
        }
    tb = statistics.median(r.measured["decode_tokens_per_sec_b1"] for r in base)
    ta = statistics.median(r.measured["decode_tokens_per_sec_b1"] for r in ad)
    extra = tb / ta - 1
    return {
        "claim": claim,
        "verdict": "true" if 0.05 <= extra <= 0.10 else "false",
        "evidence": f"decode at batch 1: 16-bit base {tb:,.1f} tokens/s, 4-bit + adapter {ta:,.1f} "
        f"({extra:+.0%} time per token)",
    }


def claim_merge_restores_latency(infer_records) -> dict:
    base, mg = _gpu_infer(infer_records, "base16"), _gpu_infer(infer_records, "merged16")
    claim = "merging restores base latency"
    if not (base and mg):
        return {"claim": claim, "verdict": "untested", "evidence": "no GPU infer-bench run committed yet"}
    tb = statistics.median(r.measured["decode_tokens_per_sec_b1"] for r in base)
    tm = statistics.median(r.measured["decode_tokens_per_sec_b1"] for r in mg)
    return {
        "claim": claim,
        "verdict": "true" if abs(tm / tb - 1) <= 0.05 else "false",
        "evidence": f"decode at batch 1: base {tb:,.1f}, merged {tm:,.1f} tokens/s",
    }


def claim_merged_needs_16bit() -> dict:
    from ..estimate.inference import InferSettings, estimate_inference

    m, s, inf = resolve_model("llama-3.1-8b"), Settings(), InferSettings()
    base = estimate_inference(m, s, inf, "base16").components["weights_16bit"]
    merged = estimate_inference(m, s, inf, "merged16").components["weights_16bit"]
    q = estimate_inference(m, s, inf, "adapters4")
    four = q.components["weights_4bit"] + q.components["quant_constants"] + q.components["weights_16bit"]
    return {
        "claim": "a merged model needs full 16-bit memory",
        "verdict": "true (estimate)" if merged == base else "false",
        "evidence": f"Llama-3.1-8B: merged weights {merged / GiB:.2f} GiB = the 16-bit base; the 4-bit base "
        f"with its adapter holds {four / GiB:.2f} GiB of weights (re-quantizing the merged model "
        "gets back to that)",
    }


def claims(records: list[Record], infer_records: list[Record] = ()) -> list[dict]:
    infer_records = list(infer_records)
    return [
        claim_70b_48gb(records),
        claim_8b_10_12gb(records),
        claim_8b_base_nf4(records),
        claim_double_quant(records),
        claim_qlora_slower(records),
        claim_3x_on_24gb(records),
        claim_nf4_symmetric(),
        claim_unmerged_latency(infer_records),
        claim_merge_restores_latency(infer_records),
        claim_merged_needs_16bit(),
    ]
