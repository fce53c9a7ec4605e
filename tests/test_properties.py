"""Properties over random configurations (hypothesis).

Each estimate replays a whole training step through the allocator model (tenths of a second for a 70B model, and
plan replays several), so CI draws a few dozen examples; `QLORA_BENCH_PROPERTY_EXAMPLES` multiplies them
(nox -s fuzz: 10).
"""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_bench.estimate import estimate
from qlora_bench.plan import plan, usable_bytes
from qlora_bench.profiles import gpu_names, model_names, resolve_gpu, resolve_model
from qlora_bench.settings import OPTIMIZERS, Settings

SCALE = float(os.environ.get("QLORA_BENCH_PROPERTY_EXAMPLES", "1"))


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


models = st.sampled_from(model_names()).map(resolve_model)
configs = st.builds(
    Settings,
    method=st.sampled_from(["qlora", "lora", "full"]),
    double_quant=st.booleans(),
    rank=st.sampled_from([4, 8, 16, 64]),
    optimizer=st.sampled_from(list(OPTIMIZERS)),
    gradient_checkpointing=st.booleans(),
    batch=st.integers(1, 16),
    seq=st.integers(1, 8192),
    attn=st.sampled_from(["sdpa", "eager", "flash_attention_2"]),
    upcast_non_quantized=st.booleans(),
)


ALLOCATOR_NOISE_BYTES = 20 * 2**20
ALLOCATOR_NOISE = 0.005


@settings(max_examples=examples(40), deadline=None)
@given(models, configs, st.sampled_from(["batch", "seq"]), st.integers(1, 512))
def test_more_tokens_never_need_less_memory(model, s, key, more):
    a = estimate(model, s)
    b = estimate(model, s.with_(**{key: getattr(s, key) + more}))
    # Allocated bytes are block sizes (an unsplit remainder counts), so they can drop by a segment's rounding.
    # The caching allocator's reserved peak is not monotone at all: with more tokens the peak's requests can land
    # in blocks cached earlier that smaller requests had split differently (seen: 1B full, 1x4 -> 7x4 tokens,
    # one vocab x hidden segment less). It never drops below what the smaller step allocates, though.
    slack = max(ALLOCATOR_NOISE_BYTES, round(a.peak_reserved_bytes * ALLOCATOR_NOISE))
    assert b.peak_allocated_bytes >= a.peak_allocated_bytes - slack
    assert b.peak_reserved_bytes >= a.peak_allocated_bytes - slack


dense_models = st.sampled_from([n for n in model_names() if not resolve_model(n).is_moe]).map(resolve_model)


@settings(max_examples=examples(30), deadline=None)
@given(dense_models, configs)
def test_weights_qlora_lt_lora_lt_full_total(model, s):
    q = estimate(model, s.with_(method="qlora"))
    lo = estimate(model, s.with_(method="lora"))
    f = estimate(model, s.with_(method="full"))
    weights = lambda e: sum(e.components.get(k, 0) for k in ("weights_4bit", "quant_constants", "weights_dense"))  # noqa
    assert weights(q) < weights(lo) < f.peak_allocated_bytes


@settings(max_examples=examples(20), deadline=None)
@given(models, configs, st.sampled_from(gpu_names() + ["24gb", "48gb", "2x24gb"]))
def test_fits_agrees_with_peak_and_gpu(model, s, gpu_name):
    gpu = resolve_gpu(gpu_name)
    p = plan(model, s, gpu)
    e = p.estimate
    margin = e.overheads.margin(s.method)
    assert p.fits == (round((e.peak_device_bytes - e.paged_bytes) * (1 + margin)) <= usable_bytes(gpu))
    assert p.fits == (p.headroom_bytes >= 0)
    assert e.device_low_bytes <= e.peak_device_bytes <= e.device_high_bytes
    assert sum(e.components.values()) == e.peak_device_bytes
    if p.fits:
        assert p.max_batch >= s.batch and p.max_seq >= s.seq
    else:
        assert p.max_batch < s.batch or p.max_seq < s.seq or p.max_batch == 0


def test_moe_qlora_trap_is_modelled():
    """transformers 5.x: Mixtral's fused experts are not nn.Linear, so the bitsandbytes path leaves ~45 B
    parameters unquantized and peft's upcast makes them fp32: 'QLoRA' then holds more than LoRA."""
    m = resolve_model("mixtral-8x7b")
    q = estimate(m, Settings())
    lo = estimate(m, Settings(method="lora"))
    assert q.components["weights_dense"] > lo.components["weights_dense"]
    assert any("bitsandbytes does not quantize" in n for n in q.notes)
    no_upcast = estimate(m, Settings(upcast_non_quantized=False))
    assert no_upcast.components["weights_dense"] < lo.components["weights_dense"]
