"""qlora-bench: memory planning and benchmarking for LLM fine-tuning (full, LoRA, QLoRA).

The planning side (profiles, settings, estimate, plan) is pure Python and never imports torch.
"""

__version__ = "0.1.0"
