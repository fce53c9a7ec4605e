"""Library noise off while the runner works (run, sweep workers, infer-bench, merge), in one place.

What `qlora-bench run` printed on every call before this (transformers 5.23, peft 0.21, bitsandbytes 0.50,
torch 2.13, CPU), all dropped:
- bitsandbytes' logger, at import on CPUs with avx512_bf16: "Failed to load CPU gemm_4bit_forward from
  kernels-community ... pip install kernels": an optional kernel (and installing it would download code from
  the hub at import); the built-in CPU path runs instead;
- transformers FutureWarnings "`gradient_checkpointing_enable` / `is_gradient_checkpointing` / (TrainingArguments)
  `gradient_checkpointing` is deprecated ... v6": API renames, raised from inside transformers and peft;
- transformers' logger (trainer sft): "The tokenizer has new PAD/BOS/EOS tokens ...": about the stand-in
  tokenizer over random token ids;
- bitsandbytes UserWarning "Paged optimizers are not supported on CPU": a CPU run is a smoke test and its record
  says that no GPU memory was measured.
Kept: every other warning category (UserWarning, RuntimeWarning, ...) from anywhere, every FutureWarning or
DeprecationWarning that is not raised inside these libraries, ERROR-level log records, exceptions (recorded as the
outcome and rendered), and transformers' loading / saving progress bars (merge of a big model takes minutes).
QLORA_BENCH_VERBOSE=1 turns all of this off (shows everything).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

LIBRARIES = ("transformers", "peft", "bitsandbytes", "torch", "accelerate", "trl", "datasets")
LOGGERS = ("bitsandbytes", "peft", "accelerate", "trl", "datasets")  # transformers: through its own API below
QUIET_MESSAGES = (r"Paged optimizers are not supported on CPU",)


@contextmanager
def quiet_libraries():
    """Within: deprecation chatter from the ML libraries filtered, their loggers at ERROR; restored after."""
    if os.environ.get("QLORA_BENCH_VERBOSE"):
        yield
        return
    from transformers.utils import logging as hf_logging

    # transformers configures its "transformers" logger itself on first use (level WARNING): set it through
    # its API, which does that configuration first, instead of on the logger
    hf_level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for lib in LIBRARIES:
                for category in (FutureWarning, DeprecationWarning):
                    warnings.filterwarnings("ignore", category=category, module=rf"{lib}(\.|$)")
            for message in QUIET_MESSAGES:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        hf_logging.set_verbosity(hf_level)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
