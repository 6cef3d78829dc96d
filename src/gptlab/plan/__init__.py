"""The planner: exact sizes, FLOPs, memory, time and cost, scaling laws and inference sizing (``gptlab plan``).

Every formula cites its source in its docstring; ``docs/planning.md`` works published examples and says where they
are off.
"""

from .hardware import HARDWARE, PF_DAY, Hardware, hardware, measure_cpu, training_time
from .memory import (
    DTYPE_BYTES,
    OPTIMIZERS,
    activation_bytes_per_layer,
    inference,
    kv_cache_bytes,
    training_memory,
    weights_bytes,
)
from .scaling import (
    BESIROGLU,
    HOFFMANN,
    METHODS,
    ChinchillaLaw,
    allocate,
    compare_allocations,
    kaplan_loss_c,
    kaplan_loss_d,
    kaplan_loss_n,
    kaplan_loss_nd,
    size_for_loss_ratio,
)
from .shape import (
    Shape,
    attention_cost,
    attention_crossover,
    forward_flops_per_token,
    matmul_params,
    mfu,
    palm_flops_per_token,
    params,
    resolve,
    training_flops_per_token,
)

__all__ = [
    "BESIROGLU",
    "DTYPE_BYTES",
    "HARDWARE",
    "HOFFMANN",
    "METHODS",
    "OPTIMIZERS",
    "PF_DAY",
    "ChinchillaLaw",
    "Hardware",
    "Shape",
    "activation_bytes_per_layer",
    "allocate",
    "attention_cost",
    "attention_crossover",
    "compare_allocations",
    "forward_flops_per_token",
    "hardware",
    "inference",
    "kaplan_loss_c",
    "kaplan_loss_d",
    "kaplan_loss_n",
    "kaplan_loss_nd",
    "kv_cache_bytes",
    "matmul_params",
    "measure_cpu",
    "mfu",
    "palm_flops_per_token",
    "params",
    "resolve",
    "size_for_loss_ratio",
    "training_flops_per_token",
    "training_memory",
    "training_time",
    "weights_bytes",
]
