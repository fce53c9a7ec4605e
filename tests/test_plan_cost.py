"""Time and money: cost per epoch, data-parallel time, `plan --gpu all` (which card) and `plan --fastest` (which
settings), through the functions and the command line as a user types it."""

import json

import pytest

from qlora_bench.cli import main
from qlora_bench.estimate import estimate
from qlora_bench.plan import (
    DATA_PARALLEL_EFFICIENCY,
    _settings_variants,
    best_on,
    fastest,
    fits_with_margin,
    plan,
    rank_gpus,
    usable_bytes,
)
from qlora_bench.profiles import gpu_names, resolve_gpu
from qlora_bench.settings import Settings


def run(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cost_is_time_times_price_times_gpus(llama8b):
    one = plan(llama8b, Settings(), resolve_gpu("h100"), 10**8, epochs=2)
    assert one.price_per_hour == resolve_gpu("h100").price_per_hour > 0
    assert one.cost_usd == pytest.approx(one.epoch_seconds * 2 / 3600 * one.price_per_hour)
    two = plan(llama8b, Settings(), resolve_gpu("2xh100"), 10**8, epochs=2, price=3.0)
    assert two.epoch_seconds == pytest.approx(one.epoch_seconds / (2 * DATA_PARALLEL_EFFICIENCY))
    assert two.cost_usd == pytest.approx(two.epoch_seconds * 2 / 3600 * 3.0 * 2)
    assert any("90% scaling" in n for n in two.notes)
    assert plan(llama8b, Settings(), resolve_gpu("rtx-a6000"), 10**8).cost_usd is None  # no price in its profile


def test_best_on_a_card_keeps_the_global_batch_and_fits(llama8b):
    s = Settings(batch=8)
    o = best_on(llama8b, s, resolve_gpu("rtx-4090"), 10**8)
    st = o.settings
    assert st.batch * st.grad_accum == 8 and 8 % st.batch == 0
    assert fits_with_margin(estimate(llama8b, st), usable_bytes(resolve_gpu("rtx-4090")))
    bigger = st.batch * 2
    if bigger <= 8:  # the next divisor up does not fit
        assert not fits_with_margin(estimate(llama8b, s.with_(batch=bigger, grad_accum=8 // bigger)),
                                    usable_bytes(resolve_gpu("rtx-4090")))


def test_ranking_puts_fitting_cards_by_cost_first(llama8b):
    options = rank_gpus(llama8b, Settings(), [resolve_gpu(g) for g in gpu_names()], 10**8)
    costs = [o.plan.cost_usd for o in options if o.plan and o.plan.fits and o.plan.cost_usd is not None]
    assert costs == sorted(costs) and len(costs) >= 5
    seen_unpriced = seen_nothing = False
    for o in options:  # priced, then unpriced, then nothing fits
        fits = bool(o.plan and o.plan.fits)
        priced = fits and o.plan.cost_usd is not None
        assert not (priced and (seen_unpriced or seen_nothing))
        seen_unpriced |= fits and not priced
        seen_nothing |= not fits


def test_fastest_is_at_least_as_fast_and_fits(llama8b):
    s, gpu = Settings(batch=8), resolve_gpu("h100")
    best, *mine = fastest(llama8b, s, gpu, 10**8)
    assert best.plan.fits and best.settings.batch * best.settings.grad_accum == 8
    assert best.settings.method == s.method and best.settings.rank == s.rank and best.settings.targets == s.targets
    if mine:
        assert best.plan.tokens_per_sec > mine[0].plan.tokens_per_sec and best.why
    # nothing searched that fits is faster (each variant priced and replayed here)
    for v, _ in _settings_variants(llama8b, s):
        if fits_with_margin(estimate(llama8b, v), usable_bytes(gpu)):
            assert plan(llama8b, v, gpu, 10**8, searches=False).tokens_per_sec <= best.plan.tokens_per_sec * 1.0001


def test_cli_gpu_all_and_list(capsys):
    code, out, _ = run(capsys, "plan", "--model", "8b", "--gpu", "all", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == len(gpu_names())
    assert {"gpu", "describe", "fits", "tokens_per_sec", "epoch_seconds", "cost_usd", "price_per_hour"} <= set(rows[0])
    code, out, _ = run(capsys, "plan", "--model", "8b", "--gpu", "h100, rtx-4090", "--price", "1")
    assert code == 0 and "h100-sxm" in out and "rtx-4090" in out and "--price for every card" in out


def test_cli_fastest(capsys):
    code, out, _ = run(capsys, "plan", "--model", "8b", "--gpu", "h100", "--batch", "4", "--fastest")
    assert code == 0 and "fastest settings that fit" in out and "searched:" in out


@pytest.mark.parametrize("args, needle", [
    (("--gpu", "all", "--fastest"), "drop --trace / --fastest"),
    (("--gpu", "all", "--method", "all"), "plans one method"),
    (("--gpu", " , "), "name GPUs separated by commas"),
    (("--gpu", "h100,nope"), "unknown GPU"),
    (("--gpu", "24gb", "--fastest"), "--fastest needs predicted step times"),
    (("--gpu", "h100", "--price", "-1"), "--price"),
    (("--gpu", "h100", "--epochs", "0"), "--epochs"),
])
def test_cli_refuses_in_one_line(capsys, args, needle):
    code, out, err = run(capsys, "plan", "--model", "8b", *args)
    assert code == 2 and needle in err and "Traceback" not in err + out


def test_a_gpu_count_splits_the_global_batch(llama8b):
    o = best_on(llama8b, Settings(batch=8), resolve_gpu("4xrtx-4090"), 10**8)
    assert o.settings.batch * o.settings.grad_accum * 4 == 8
    assert o.plan.total_tokens_per_sec == pytest.approx(o.plan.tokens_per_sec * 4 * DATA_PARALLEL_EFFICIENCY)
    odd = best_on(llama8b, Settings(batch=6), resolve_gpu("4xrtx-4090"), 10**8)
    assert odd.plan is None and "does not split across 4 GPUs" in odd.why
