"""The runner: real training steps on the GPU at hand (or the CPU for smoke tests), recorded as results.

Heavy imports (torch, transformers, peft, bitsandbytes) happen inside these modules only; `plan` never loads them.
Layers: materialize.py (random-weight models from configs, 4-bit in place) -> train.py (the timed step loop) ->
probes.py (memory, NVML, environment) -> worker.py (one configuration in a fresh process) -> sweep.py (grids,
subprocesses, resume, OOM ordering, shards).
"""
