"""Base-model weights on the device, per dtype, for each method.

- full / lora: the model is loaded in the compute dtype (`torch_dtype=bfloat16`), every parameter 16-bit.
- qlora: transformers' bitsandbytes path converts every `nn.Linear` inside the decoder layers to
  `Linear4bit`; `get_keys_to_not_convert` keeps the output layer (lm_head), and embeddings, norms, biases and
  non-Linear parameters (transformers 5.x MoE experts and routers are fused `nn.Parameter`s) stay 16-bit.
  peft's `prepare_model_for_kbit_training` then casts every fp16/bf16 parameter that is not `Params4bit`
  to fp32 ("cast all non INT8 parameters to fp32", peft/utils/other.py); `upcast_non_quantized=False` models
  trainers that skip that cast.
- Tied embeddings share one Parameter and count once (ModelSpec.lm_head_params is 0 then).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles import ModelSpec
from ..settings import Settings
from .dtypes import nbytes
from .quantization import quantized_tensor_bytes


@dataclass(frozen=True)
class WeightBytes:
    quantized_packed: int = 0  # 4-bit data of Linear4bit layers
    quant_constants: int = 0  # absmax, codes, double-quant statistics
    dense: int = 0  # every parameter that is not 4-bit, in its dtype
    dense_params: int = 0
    dense_dtype: str = "bf16"
    quantized_params: int = 0
    largest_quantized_numel: int = 0  # the weight QLoRA dequantizes before each matmul
    upcast_transient: int = 0  # prepare_model_for_kbit_training: 16-bit copy alive while casting the largest tensor

    @property
    def total(self) -> int:
        return self.quantized_packed + self.quant_constants + self.dense


def non_quantized_params(model: ModelSpec) -> int:
    """Parameters the bitsandbytes path leaves in 16-bit: embeddings, lm_head, norms, biases, non-Linear weights."""
    non_linear = sum(m.weight_params for m in model.layer_modules() if not m.is_linear) * model.num_layers
    biases = model.layer_bias_params * model.num_layers
    return model.embedding_params + model.lm_head_params + model.norm_params + biases + non_linear


def quantized_modules(model: ModelSpec):
    return [m for m in model.layer_modules() if m.is_linear]


def weight_bytes(model: ModelSpec, s: Settings) -> WeightBytes:
    base_dtype = "fp32" if s.compute_dtype == "fp32" else s.compute_dtype
    if s.method != "qlora":
        return WeightBytes(
            dense=model.total_params * nbytes(base_dtype), dense_params=model.total_params, dense_dtype=base_dtype
        )
    packed = constants = qparams = largest = 0
    for m in quantized_modules(model):
        q = quantized_tensor_bytes(m.in_features * m.out_features, s.blocksize, s.double_quant)
        n = m.count * model.num_layers
        packed += q.packed * n
        constants += q.constants * n
        qparams += m.weight_params * model.num_layers
        largest = max(largest, m.in_features * m.out_features)
    dense_params = non_quantized_params(model)
    dense_dtype = "fp32" if s.upcast_non_quantized else ("bf16" if s.compute_dtype == "fp32" else s.compute_dtype)
    biggest_dense = max(model.embedding_params, model.lm_head_params)
    transient = biggest_dense * 2 if s.upcast_non_quantized else 0
    return WeightBytes(
        quantized_packed=packed,
        quant_constants=constants,
        dense=dense_params * nbytes(dense_dtype),
        dense_params=dense_params,
        dense_dtype=dense_dtype,
        quantized_params=qparams,
        largest_quantized_numel=largest,
        upcast_transient=transient,
    )
