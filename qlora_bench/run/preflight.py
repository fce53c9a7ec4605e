"""Before a run on the CPU: a rough price in memory and time, so that `run --model llama-3.1-8b` on a machine
without CUDA says what it would cost (and stops, unless --yes) instead of sitting silent for an hour at many GB.

Pure Python (the estimator, no torch), so tests can call it with a made-up amount of available memory.

Memory: a CPU run builds the same tensors as a GPU run — materialize.build_model draws the weights in the
compute dtype (bf16 by default) on whatever device it is given, 4-bit decoder linears for QLoRA, and peft's
fp32 upcast and fp32 adapters follow — so the estimator's torch-allocated peak (weights, gradients, optimizer
states, activations) is the tensor part; on the CPU there is no cuBLAS workspace and bitsandbytes' paged
optimizer states are ordinary memory. PROCESS_BYTES adds the libraries and the CPU allocator's slack.
Time: the estimator's hardware FLOPs per step over CPU_FLOPS; building the model is not counted. Both are rough;
they only need to tell a smoke test from a run that will not finish. Checked here on llama-3.2-1b LoRA at seq 128,
one step: 3.6 GiB predicted, 3.2 GiB peak RSS measured; 18 s predicted per step, 2.8 s measured (plus ~10 s of
building), i.e. this machine is faster than CPU_FLOPS assumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..units import GiB

# Effective CPU FLOP/s, rough and conservative. Measured with run_config on this project's 2-core AMD EPYC VM
# (avx512_bf16), hardware FLOPs from estimate.throughput over the median step: 95-106 GFLOP/s for
# tests/data/tiny-llama at seq 2048 (lora, qlora), 180-400 GFLOP/s for 20M- and 160M-parameter llama configs at
# seq 512 (bf16), 81 GFLOP/s with fp32 compute. Half the slowest, for CPUs without bf16 matrix instructions.
CPU_FLOPS = 50e9
# torch + transformers + peft + bitsandbytes imported: 0.39 GiB RSS measured here; the runs' peak RSS was
# 0.4-0.85 GiB above the estimator's tensor peak (tiny-llama, 20M and 160M configs): round up.
PROCESS_BYTES = 1 * GiB
# A CPU run is a smoke test: beyond these it is most likely a mistake (the user can say --yes).
MAX_BYTES = 4 * GiB
MAX_SECONDS = 60.0
ADVICE = "use a small model (1b, a tiny config.json) or a shorter {knob}, or a GPU, or pass --yes to run anyway"


@dataclass(frozen=True)
class CpuCost:
    bytes: int  # peak RSS, rough
    seconds: float  # the whole run, rough
    step_seconds: float | None = None  # one optimizer step (training), rough
    steps: int = 0


def train_cost(spec, s, steps: int) -> CpuCost:
    """`steps` optimizer steps (warm-up included) of settings `s` on the CPU."""
    from ..estimate import estimate
    from ..estimate.throughput import flops

    e = estimate(spec, s)
    tensors = e.peak_allocated_bytes - e.overheads.cublas_workspace + e.paged_bytes
    step = flops(spec, s).hardware_per_token * s.batch * s.seq * s.grad_accum / CPU_FLOPS
    return CpuCost(tensors + PROCESS_BYTES, step * steps, step, steps)


def infer_cost(spec, cfg) -> CpuCost:
    """One infer-bench mode (an InferBenchConfig) on the CPU: its repeats of prefill and generate, at batch 1 and
    at cfg.batch; 2 FLOPs per weight and token (prefill, then generate's own prefill and its decode steps)."""
    from ..estimate.inference import InferSettings, estimate_inference
    from ..estimate.throughput import matmul_params_per_token

    switch = cfg.mode == "switch"
    inf = InferSettings(
        batch=cfg.batch,
        context=cfg.prompt + cfg.new_tokens,
        prompt=cfg.prompt,
        adapters=cfg.adapters if switch else 1,
    )
    e = estimate_inference(spec, cfg.settings, inf, "adapters4" if switch else cfg.mode)
    tensors = e.peak_allocated_bytes - e.components.get("cublas_workspace", 0)
    tokens = sum(b * (2 * cfg.prompt + cfg.new_tokens) for b in {1, cfg.batch})
    seconds = 2 * matmul_params_per_token(spec) * tokens * cfg.repeats / CPU_FLOPS
    return CpuCost(tensors + PROCESS_BYTES, seconds)


def available_memory() -> int | None:
    """Memory this process could still get: MemAvailable (Linux), capped by a cgroup v2 limit (containers);
    os.sysconf's free pages elsewhere; None if the system does not say."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((cg / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n < 10 * GiB else f"{n / GiB:.0f} GiB"


def _dur(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 10 * 3600 else f"{seconds / 3600:.0f} h"


def too_big(cost: CpuCost, available: int | None) -> bool:
    limit = MAX_BYTES if available is None else min(MAX_BYTES, available)
    return cost.bytes > limit or cost.seconds > MAX_SECONDS


def describe(what: str, model: str, cost: CpuCost, available: int | None) -> str:
    """One line: what the run would need here."""
    if cost.step_seconds is not None:
        time = f"~{_dur(cost.step_seconds)} per step, ~{_dur(cost.seconds)} for {cost.steps} steps"
    else:
        time = f"~{_dur(cost.seconds)}"
    avail = f"; {_gib(available)} available" if available is not None else ""
    limits = f"a CPU run is a smoke test: up to {MAX_BYTES / GiB:g} GiB and {MAX_SECONDS:g} s"
    return f"{what} on CPU: {model} needs about {_gib(cost.bytes)} of RAM and {time} here (rough{avail}; {limits})"


def refusal(what: str, costs: list[tuple[CpuCost, str]], available: int | None, knob: str = "--seq") -> str | None:
    """The one-line refusal for CPU runs (cost, label) of which some are too big, naming the most expensive;
    None when all are fine. Pure: `available` is the caller's figure (None: unknown)."""
    big = [(c, label) for c, label in costs if too_big(c, available)]
    if not big:
        return None
    cost, label = max(big, key=lambda x: (x[0].seconds, x[0].bytes))
    more = f" ({len(big)} of {len(costs)} configurations are too big)" if len(costs) > 1 else ""
    return f"{describe(what, label, cost, available)}{more}; {ADVICE.format(knob=knob)}"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_cpu(what: str, costs: list[tuple[CpuCost, str]], knob: str = "--seq") -> None:
    """Raise InputError when, without a GPU, any of these runs would not fit in memory or would take longer than
    a smoke test. Asks torch about the GPU only then: a sweep's parent process need not load torch otherwise."""
    message = refusal(what, costs, available_memory(), knob)
    if message and not cuda_available():
        raise InputError(message)
