"""plan: suggestions are concrete, each with its resulting peak, and they are true when re-planned."""

from qlora_bench.plan import plan, retry_replay, usable_bytes
from qlora_bench.profiles import resolve_gpu, resolve_model
from qlora_bench.settings import Settings


def _by_flag(p):
    return {s.flags: s for s in p.suggestions}


def test_70b_on_48gb_suggests_no_upcast_which_decides_the_verdict():
    p = plan(resolve_model("70b"), Settings(), resolve_gpu("48gb"))
    assert not p.fits and p.max_batch == 0
    s = _by_flag(p)["--no-upcast-non-quantized"]
    assert s.fits and s.decides_verdict
    again = plan(resolve_model("70b"), s.settings, resolve_gpu("48gb"))
    assert again.fits and again.estimate.peak_device_bytes == s.peak_device_bytes
    assert any("without peft's fp32 upcast" in n for n in again.notes)


def test_suggestions_for_8b_full_on_24gb():
    p = plan(resolve_model("8b"), Settings(method="full", optimizer="adamw_torch_fused"), resolve_gpu("24gb"))
    flags = _by_flag(p)
    assert flags["--method qlora"].fits and flags["--method lora"].fits
    assert any("FSDP" in s.change and s.fits for s in p.suggestions)
    assert any(s.change.startswith("a GPU with more memory") for s in p.suggestions)
    for s in p.suggestions:  # every listed change saves memory
        assert s.peak_device_bytes <= p.estimate.peak_device_bytes


def test_micro_batch_with_accumulation_keeps_the_effective_batch():
    m, g = resolve_model("8b"), resolve_gpu("rtx-4090")
    p = plan(m, Settings(batch=16), g)
    s = next(x for x in p.suggestions if x.flags.startswith("--batch"))
    assert s.fits and s.settings.batch * s.settings.grad_accum >= 16 and s.settings.batch == p.max_batch


def test_max_batch_and_seq_are_the_boundary():
    m, g = resolve_model("8b"), resolve_gpu("rtx-4090")
    p = plan(m, Settings(), g)
    u = usable_bytes(g)
    from qlora_bench.plan import SEARCH_RESOLUTION

    edge_b = plan(m, Settings(batch=p.max_batch + 1), g)  # batch: exact (the resolution is one step)
    edge_s = plan(m, Settings(seq=p.max_seq + max(1, int(p.max_seq * SEARCH_RESOLUTION)) + 1), g)
    assert p.fits and not edge_b.fits and not edge_s.fits
    from qlora_bench.plan import required_bytes

    assert required_bytes(edge_s.estimate) > u >= required_bytes(p.estimate)


def test_at_the_limit_the_allocator_retry_path_is_replayed(llama8b):
    """A step whose cache does not fit but whose tensors do may still run: torch frees cached blocks and retries
    when cudaMalloc fails. plan keeps the verdict (it counts the cache) and replays the step against the
    capacity left to the allocator; it says so only when the replay completes within it."""
    s = Settings()
    near = resolve_gpu("15.1gb")  # usable between the step's allocated and reserved needs (8B QLoRA, 1x2048)
    p = plan(llama8b, s, near)
    e = p.estimate
    assert p.verdict == "does not fit"
    r = retry_replay(llama8b, s, e, usable_bytes(near))
    assert r is not None and r.oom is None and r.alloc_retries > 0
    assert e.peak_allocated_bytes <= r.peak_reserved < e.peak_reserved_bytes
    assert any(n.startswith("at the limit:") for n in p.notes)
    far = resolve_gpu("15gb")  # the live blocks' own fragmentation no longer fits: torch would raise
    assert retry_replay(llama8b, s, plan(llama8b, s, far).estimate, usable_bytes(far)) is None
    assert not any(n.startswith("at the limit:") for n in plan(llama8b, s, far).notes)
