"""The merge workflow the guides describe, for users' own adapters (`qlora-bench merge`):

base loaded in 16-bit (not 4-bit: merging into quantized weights would round the update away) -> the adapter
applied with peft -> `merge_and_unload()` -> saved as safetensors -> reloaded with plain transformers to check
that the merged checkpoint stands on its own (no peft needed to serve it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .materialize import torch_dtype
from .quiet import quiet_libraries

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def merge_adapter(base: str, adapter: str, out: str | Path, device: str = "cpu", dtype: str = "bf16") -> dict:
    with quiet_libraries():
        return _merge(base, adapter, out, device, dtype)


def _merge(base: str, adapter: str, out: str | Path, device: str, dtype: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(dtype), device_map=device)
    n_base = sum(p.numel() for p in model.parameters())
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:  # a servable folder: keep the base's tokenizer files next to the weights
        src = Path(base) / name
        if src.is_file():
            shutil.copy(src, out / name)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype(dtype), device_map=device)
    n_out = sum(p.numel() for p in reloaded.parameters())
    if n_out != n_base:
        raise RuntimeError(f"merged model has {n_out} parameters, the base {n_base}")
    files = sorted(out.glob("*.safetensors"))
    return {
        "out": str(out),
        "params": n_out,
        "files": [f.name for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "dtype": dtype,
        "device": device,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
