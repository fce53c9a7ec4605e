"""What fine-tuning guides claim, checked against the committed measurements and the estimator.

Each claim gets a machine-readable `status` (confirmed / not confirmed / untested), a `verdict` sentence that says
the same in words a reader gets right without the numbers (how far and in which direction the measurement differs
from the claim, and whether it rests on a measurement or on the estimator), the evidence, and where it came from.
Verdicts are computed from records and estimates here, never typed in.
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
STATUSES = ("confirmed", "not confirmed", "untested")


def _result(claim: str, status: str, finding: str, evidence: str) -> dict:
    """The verdict sentence leads with the status, so it cannot be read the wrong way round; an untested claim's
    finding says why ("not measured yet ...")."""
    assert status in STATUSES, status
    verdict = finding if status == "untested" else f"{status}: {finding}"
    return {"claim": claim, "status": status, "verdict": verdict, "evidence": evidence}


def _pct_span(values) -> str:
    """A spread of fractions as "33-35 %", or "33 %" when they agree at that precision."""
    lo, hi = (f"{100 * v:.0f}" for v in (min(values), max(values)))
    return f"{lo} %" if lo == hi else f"{lo}-{hi} %"


def _vs_range(values, lo: float, hi: float) -> str:
    """Where measured values sit against a claimed range [lo, hi]."""
    if all(v > hi for v in values):
        return "more than claimed"
    if all(v < lo for v in values):
        return "less than claimed"
    if all(lo <= v <= hi for v in values):
        return "within the claimed range"
    return "partly outside the claimed range"


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
    need_up, need_no = required_bytes(up.estimate) / GiB, required_bytes(no_up.estimate) / GiB
    cap = g.memory_total_bytes / GiB
    # the verdict rests on the estimator unless a 70B run was measured
    measured = _find(records, "llama-3.1-70b", method="qlora")
    basis = "the estimator" if measured else "the estimator (no 70B run measured)"
    if up.fits:
        status, finding = "confirmed", f"{basis} puts it at {need_up:.1f} of {cap:.0f} GiB"
    elif no_up.fits:
        status = "not confirmed"
        finding = (
            f"{basis} puts it at {need_up:.1f} GiB with peft's default fp32 upcast, {need_up - cap:.1f} GiB over "
            f"{cap:.0f} GiB; it fits ({need_no:.1f} GiB) only without the upcast"
        )
    else:
        status = "not confirmed"
        finding = f"{basis} puts it at {need_no:.1f} GiB even without the fp32 upcast, over {cap:.0f} GiB"
    return _result(
        "70B QLoRA fits in 48 GB",
        status,
        finding,
        f"Llama-3.1-70B, r=16, 1x2048, paged 8-bit AdamW on 48 GiB: needs {need_up:.1f} GiB with peft's fp32 "
        f"upcast of embeddings/lm_head, {need_no:.1f} GiB without it (longest sequence {no_up.max_seq:,} tokens)."
        + ("" if measured else " No 70B run measured yet."),
    )


def claim_8b_10_12gb(records) -> dict:
    claim = "8B QLoRA needs 10-12 GB"
    recs = _find(records, "llama-3.1-8b", method="qlora", rank=16, double_quant=True, batch=1, seq=2048)
    m = resolve_model("llama-3.1-8b")
    longest = max_seq(m, Settings(), int(12 * GB))  # the longest step whose device peak stays within 12 GB
    if not recs:
        return _result(
            claim,
            "untested",
            "not measured yet",
            f"estimator: within 12 GB up to {longest:,} tokens per step",
        )
    dev = statistics.median(r.measured["peak_device_bytes"] for r in recs) / GB
    if dev > 12:
        status, finding = "not confirmed", f"measured {dev:.1f} GB, {dev - 12:.1f} GB more than claimed"
    else:
        status, finding = "confirmed", f"measured {dev:.1f} GB" + (", less than claimed" if dev < 10 else "")
    finding += " (1x2048 tokens)"
    return _result(
        claim,
        status,
        finding,
        f"measured on an H100: {dev:.1f} GB device peak for Llama-3.1-8B QLoRA r=16, 1x2048 "
        f"({len(recs)} runs). The estimator keeps 8B QLoRA within 12 GB up to {longest:,} tokens per step.",
    )


def claim_8b_base_nf4(records) -> dict:
    claim = "an 8B base in NF4 takes ~5.5 GB"
    recs = _find(records, "llama-3.1-8b", method="qlora", double_quant=True)
    from ..estimate.weights import weight_bytes

    # as loaded, before peft's upcast: 4-bit linears + constants, 16-bit embeddings, lm_head and norms
    est = weight_bytes(resolve_model("llama-3.1-8b"), Settings(upcast_non_quantized=False)).total / GB
    if not recs:
        return _result(claim, "untested", f"not measured yet (estimator: {est:.2f} GB)", f"estimator {est:.2f} GB")
    built = statistics.median(r.measured["mem_after_model_build"]["allocated"] for r in recs) / GB
    diff = built - 5.5
    status = "confirmed" if abs(diff) <= 0.5 else "not confirmed"  # "~" read as within 0.5 GB
    return _result(
        claim,
        status,
        f"measured {built:.2f} GB, {abs(diff):.2f} GB {'more' if diff > 0 else 'less'} than claimed",
        f"measured: {built:.2f} GB allocated after loading Llama-3.1-8B in NF4 + double quant (bf16 "
        f"embeddings and lm_head); estimator {est:.2f} GB",
    )


def claim_double_quant(records) -> dict:
    n = 4096 * 4096
    saved = bits_per_param(n, 64, False) - bits_per_param(n, 64, True)
    dq = _find(records, "llama-3.1-8b", method="qlora", double_quant=True, batch=1, seq=2048)
    nodq = _find(records, "llama-3.1-8b", method="qlora", double_quant=False, batch=1, seq=2048)
    ev = f"bitsandbytes' own tensors: {saved:.3f} bit/param saved (4.500 -> {bits_per_param(n, 64, True):.3f})"
    # the claim is about the format, so bitsandbytes' tensor sizes decide; the H100 measurement is shown beside
    finding = f"bitsandbytes' tensor sizes save {saved:.3f} bit/param"
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
        finding += f" ({8 * diff / qparams:.3f} measured, allocator rounding included)"
    return _result(
        "double quantization saves ~0.37 bit/param",
        "confirmed" if abs(saved - 0.37) < 0.01 else "not confirmed",
        finding,
        ev,
    )


def claim_qlora_slower(records) -> dict:
    claim = "QLoRA trains 20-30% slower than LoRA"
    parts, slow, short = [], [], False
    for model, b, s in (("llama-3.2-1b", 4, 1024), ("llama-3.1-8b", 1, 2048)):
        lo = _find(records, model, method="lora", batch=b, seq=s, gradient_checkpointing=True)
        q = _find(records, model, method="qlora", batch=b, seq=s, double_quant=True, gradient_checkpointing=True)
        if lo and q:
            tl = statistics.median(r.measured["tokens_per_sec"] for r in lo)
            tq = statistics.median(r.measured["tokens_per_sec"] for r in q)
            slow.append(1 - tq / tl)
            parts.append(f"{model} {b}x{s}: LoRA {tl:,.0f}, QLoRA {tq:,.0f} tokens/s ({1 - tq / tl:.0%} slower)")
            short |= any(r.measured.get("step_seconds_median", 0) < 1 for r in lo + q)
    if not slow:
        return _result(claim, "untested", "not measured yet (no LoRA / QLoRA pair at the same shape)", "no pair")
    status = "confirmed" if all(0.2 <= x <= 0.3 for x in slow) else "not confirmed"
    if all(x >= 0 for x in slow):
        size = f"{_pct_span(slow)} slower"
    elif all(x < 0 for x in slow):
        size = f"{_pct_span([-x for x in slow])} faster"
    else:
        size = f"between {-100 * min(slow):.0f} % faster and {100 * max(slow):.0f} % slower"
    # steps under a second vary by up to 30 %: the reader should know how firm the numbers are
    caveat = " (steps < 1 s)" if short else ""
    return _result(
        claim,
        status,
        f"measured {size}, {_vs_range(slow, 0.2, 0.3)}{caveat}",
        "; ".join(parts) + " on an H100 (median of repeats; short steps vary up to 30 %)",
    )


def claim_3x_on_24gb(records) -> dict:
    from ..plan import best_on

    m, g = resolve_model("llama-3.1-8b"), resolve_gpu("rtx-4090")
    lo = plan(m, Settings(method="lora", optimizer="adamw_torch_fused"), g)
    q = plan(m, Settings(), g)
    # the step-time model's answer at a global batch of 8 sequences: each method's best micro-batch on the card
    bl = best_on(m, Settings(method="lora", optimizer="adamw_torch_fused", batch=8), g, 10**8)
    bq = best_on(m, Settings(batch=8), g, 10**8)
    tl = bl.plan.tokens_per_sec if bl.plan and bl.plan.fits else None
    tq = bq.plan.tokens_per_sec if bq.plan and bq.plan.fits else None
    if tl and tq:
        predicted = (
            f"predicted (step-time model, H100 constants on the RTX 4090's peaks): LoRA {tl:,.0f} tokens/s at "
            f"micro-batch {bl.settings.batch}, QLoRA {tq:,.0f} at {bq.settings.batch}: {tq / tl:.1f}x"
        )
    elif tq:
        predicted = (
            f"predicted: LoRA does not fit at batch 1, QLoRA {tq:,.0f} tokens/s at micro-batch {bq.settings.batch}"
        )
    else:
        predicted = "predicted: neither fits"
    return _result(
        "QLoRA gives ~3x the throughput of LoRA on a 24 GB card",
        "untested",
        f"not measured yet (no 24 GB card measured); {predicted}",
        f"no 24 GB card measured. Estimator, Llama-3.1-8B at 2048 tokens on an RTX 4090: largest "
        f"micro-batch LoRA {lo.max_batch}, QLoRA {q.max_batch}",
    )


def claim_nf4_symmetric() -> dict:
    claim = "NF4's levels are symmetric around zero"
    import logging

    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    try:
        # its import logs an optional CPU kernel it did not find (run/quiet.py): not the report's business
        bnb_log.setLevel(logging.ERROR)
        import bitsandbytes.functional as F

        levels = [round(float(x), 4) for x in F.get_4bit_type("nf4", device="cpu")]
    except Exception:  # bitsandbytes not installed: the report says so
        return _result(
            claim,
            "untested",
            "not checked (bitsandbytes is not installed)",
            "bitsandbytes is not installed where this report was built",
        )
    finally:
        bnb_log.setLevel(level)
    neg = sorted(-x for x in levels if x < 0)
    pos = sorted(x for x in levels if x > 0)
    if neg == pos:
        finding = f"{len(neg)} negative and {len(pos)} positive levels, mirror images"
    else:
        finding = f"{len(neg)} negative but {len(pos)} positive levels besides the exact 0"
    return _result(
        claim,
        "confirmed" if neg == pos else "not confirmed",
        finding,
        f"bitsandbytes get_4bit_type('nf4'): {len(neg)} negative and {len(pos)} positive levels "
        f"plus an exact 0: {', '.join(f'{x:g}' for x in levels)}",
    )


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
        return _result(
            claim,
            "untested",
            "not measured yet",
            "no GPU infer-bench run committed yet (qlora-bench infer-bench measures it)",
        )
    tb = statistics.median(r.measured["decode_tokens_per_sec_b1"] for r in base)
    ta = statistics.median(r.measured["decode_tokens_per_sec_b1"] for r in ad)
    extra = tb / ta - 1  # extra time per decoded token
    return _result(
        claim,
        "confirmed" if 0.05 <= extra <= 0.10 else "not confirmed",
        f"measured {extra:+.0%} time per token, {_vs_range([extra], 0.05, 0.10)}",
        f"decode at batch 1: 16-bit base {tb:,.1f} tokens/s, 4-bit + adapter {ta:,.1f} ({extra:+.0%} time per token)",
    )


def claim_merge_restores_latency(infer_records) -> dict:
    base, mg = _gpu_infer(infer_records, "base16"), _gpu_infer(infer_records, "merged16")
    claim = "merging restores base latency"
    if not (base and mg):
        return _result(claim, "untested", "not measured yet", "no GPU infer-bench run committed yet")
    tb = statistics.median(r.measured["decode_tokens_per_sec_b1"] for r in base)
    tm = statistics.median(r.measured["decode_tokens_per_sec_b1"] for r in mg)
    extra = tb / tm - 1  # extra time per token of the merged model over the base
    return _result(
        claim,
        "confirmed" if abs(tm / tb - 1) <= 0.05 else "not confirmed",  # within 5 % counts as restored
        f"measured {extra:+.0%} time per token against the base (within 5 % counts as restored)",
        f"decode at batch 1: base {tb:,.1f}, merged {tm:,.1f} tokens/s",
    )


def claim_merged_needs_16bit() -> dict:
    from ..estimate.inference import InferSettings, estimate_inference

    m, s, inf = resolve_model("llama-3.1-8b"), Settings(), InferSettings()
    base = estimate_inference(m, s, inf, "base16").components["weights_16bit"]
    merged = estimate_inference(m, s, inf, "merged16").components["weights_16bit"]
    q = estimate_inference(m, s, inf, "adapters4")
    four = q.components["weights_4bit"] + q.components["quant_constants"] + q.components["weights_16bit"]
    same = merged == base
    return _result(
        "a merged model needs full 16-bit memory",
        "confirmed" if same else "not confirmed",
        f"the estimator (not measured) puts the merged weights at {merged / GiB:.2f} GiB, "
        + ("the same as the 16-bit base" if same else f"against {base / GiB:.2f} GiB for the 16-bit base"),
        f"Llama-3.1-8B: merged weights {merged / GiB:.2f} GiB{' = the 16-bit base' if same else ''}; the 4-bit "
        f"base with its adapter holds {four / GiB:.2f} GiB of weights (re-quantizing the merged model "
        "gets back to that)",
    )


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
