"""Serving measurements (`qlora-bench infer-bench`): memory, prefill time and decode speed of the four serving
modes, and the cost of switching adapters, on random-weight models of real architectures.

Modes: base16 (16-bit base), adapters4 (4-bit base + an unmerged adapter), merged16 (adapter merged into the 16-bit
base with merge_and_unload), merged4 (the merged model's 4-bit storage: a 4-bit model of the same shapes), and
switch (4-bit base + N adapters loaded with add_adapter, switched with set_adapter per request: the memory each
adapter adds and the time of a switch). Adapters are created with non-zero B (init_lora_weights=False) so that
they really run. Each mode runs in a fresh process (worker.py), recorded with kind "infer".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field

from ..results import SCHEMA_VERSION
from ..settings import Settings
from . import probes
from .materialize import build_model, peft_targets
from .quiet import quiet_libraries

INFER_MODES = ("base16", "adapters4", "merged16", "merged4", "switch")


@dataclass(frozen=True)
class InferBenchConfig:
    model: str
    mode: str
    settings: Settings = field(default_factory=Settings)  # the adapter's rank / targets / quantization
    batch: int = 8  # the larger decode batch (batch 1 is always measured too)
    prompt: int = 512
    new_tokens: int = 32
    adapters: int = 4  # for mode switch
    repeats: int = 3
    seed: int = 0

    kind = "infer"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["settings"] = self.settings.to_dict()
        return {"kind": "infer", **d}

    @classmethod
    def from_dict(cls, d: dict) -> InferBenchConfig:
        d = {k: v for k, v in d.items() if k != "kind"}
        return cls(**{**d, "settings": Settings.from_dict(d["settings"])})

    @property
    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode(), usedforsecurity=False).hexdigest()[:12]

    @property
    def name(self) -> str:
        from .config import model_label

        return (
            f"{model_label(self.model)}/infer/{self.mode}/r{self.settings.rank}/"
            f"p{self.prompt}+{self.new_tokens}/b{self.batch}"
        )

    @property
    def id(self) -> str:
        return f"{self.name}#{self.key}"


def _lora_config(spec, s: Settings):
    import peft

    return peft.LoraConfig(
        r=s.rank,
        lora_alpha=s.alpha,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
        target_modules=peft_targets(spec, s),
        task_type="CAUSAL_LM",
    )


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_serving_model(spec, cfg: InferBenchConfig, device):
    """The model as served in this mode (eval, no gradients)."""
    import peft

    s = cfg.settings
    four_bit = cfg.mode in ("adapters4", "merged4", "switch")
    base = build_model(spec, s.with_(method="qlora" if four_bit else "lora"), device)
    for p in base.parameters():
        p.requires_grad = False
    if cfg.mode == "adapters4":
        base = peft.get_peft_model(base, _lora_config(spec, s))
    elif cfg.mode == "merged16":
        base = peft.get_peft_model(base, _lora_config(spec, s)).merge_and_unload()
    elif cfg.mode == "switch":
        base = peft.get_peft_model(base, _lora_config(spec, s), adapter_name="a0")
    return base.eval()


def run_infer(spec, cfg: InferBenchConfig, nvml=None) -> dict:
    with quiet_libraries():
        return _run_infer(spec, cfg, nvml)


def _run_infer(spec, cfg: InferBenchConfig, nvml) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    nvml = nvml if nvml is not None else (probes.try_nvml() if cuda else None)
    baseline = nvml.used_now() if nvml else None
    m: dict = {"nvml_used_baseline_bytes": baseline}
    rec = {
        "schema": SCHEMA_VERSION,
        "kind": "infer",
        "id": cfg.id,
        "key": cfg.key,
        "model": cfg.model,
        "architecture": spec.config,
        "settings": cfg.settings.to_dict(),
        "serving": {k: v for k, v in cfg.to_dict().items() if k not in ("settings", "model", "kind")},
        "outcome": "error",
        "error": None,
        "measured": m,
        "environment": None,
        "notes": [] if cuda else ["no CUDA device: a CPU smoke run, no GPU memory figures were taken"],
    }
    torch.manual_seed(cfg.seed)
    try:
        if cuda:
            torch.cuda.init()
        model = build_serving_model(spec, cfg, device)
        m["mem_after_load"] = probes.memory_snapshot(nvml)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if nvml:
            nvml.start()
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.inference_mode():
            if cfg.mode == "switch":
                per_adapter = []
                for k in range(1, cfg.adapters):
                    before = torch.cuda.memory_allocated() if cuda else None
                    model.add_adapter(f"a{k}", _lora_config(spec, cfg.settings))
                    if cuda:
                        per_adapter.append(torch.cuda.memory_allocated() - before)
                m["adapter_bytes_each"] = statistics.median(per_adapter) if per_adapter else None
                x = torch.randint(0, spec.vocab_size, (1, cfg.prompt), generator=g).to(device)
                names = [f"a{k}" for k in range(cfg.adapters)]

                turn = itertools.cycle(names)

                def switch_and_run():  # the next request's adapter, then one decode-sized forward
                    model.set_adapter(next(turn))
                    model(input_ids=x[:, :1])

                m["switch_seconds"] = _time(switch_and_run, cfg.repeats * len(names))
                m["no_switch_seconds"] = _time(lambda: model(input_ids=x[:, :1]), cfg.repeats * len(names))
            for batch in sorted({1, cfg.batch}):
                x = torch.randint(0, spec.vocab_size, (batch, cfg.prompt), generator=g).to(device)
                prefill = _time(lambda x=x: model(input_ids=x, use_cache=True), cfg.repeats)
                total = _time(
                    lambda x=x: model.generate(
                        input_ids=x,
                        attention_mask=torch.ones_like(x),
                        max_new_tokens=cfg.new_tokens,
                        min_new_tokens=cfg.new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    ),
                    cfg.repeats,
                )
                decode = max(total - prefill, 1e-9)
                m[f"prefill_seconds_b{batch}"] = round(prefill, 6)
                m[f"decode_tokens_per_sec_b{batch}"] = round(batch * (cfg.new_tokens - 1) / decode, 2)
        m["mem_after_generate"] = probes.memory_snapshot(nvml)
        rec["outcome"] = "ok"
    except torch.OutOfMemoryError as e:
        rec.update(outcome="oom", error=str(e).splitlines()[0][:500])
    except Exception as e:  # recorded, never raised
        rec.update(
            outcome="error", error=f"{type(e).__name__}: {str(e)[:500]}", traceback=traceback.format_exc()[-4000:]
        )
    finally:
        probes.finish_peaks(m, nvml, baseline)
        rec["environment"] = probes.environment(nvml)
    return rec
