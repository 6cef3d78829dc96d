"""The planner: exact sizes, FLOPs, memory, time and cost, scaling laws and inference sizing (``gptlab plan``).

Every formula cites its source in its docstring; ``docs/planning.md`` works the seeds' examples and says where they
are off.
"""

from .hardware import HARDWARE, PF_DAY, Hardware, hardware, measure_cpu, training_time
from .memory import (DTYPE_BYTES, OPTIMIZERS, activation_bytes_per_layer, inference, kv_cache_bytes,
                     training_memory, weights_bytes)
from .scaling import (BESIROGLU, HOFFMANN, METHODS, ChinchillaLaw, allocate, compare_allocations, kaplan_loss_c,
                      kaplan_loss_d, kaplan_loss_n, kaplan_loss_nd, size_for_loss_ratio)
from .shape import (Shape, attention_cost, attention_crossover, forward_flops_per_token, matmul_params, mfu,
                    palm_flops_per_token, params, resolve, training_flops_per_token)

__all__ = ["HARDWARE", "PF_DAY", "Hardware", "hardware", "measure_cpu", "training_time", "DTYPE_BYTES", "OPTIMIZERS",
           "activation_bytes_per_layer", "inference", "kv_cache_bytes", "training_memory", "weights_bytes",
           "BESIROGLU", "HOFFMANN", "METHODS", "ChinchillaLaw", "allocate", "compare_allocations", "kaplan_loss_c",
           "kaplan_loss_d", "kaplan_loss_n", "kaplan_loss_nd", "size_for_loss_ratio", "Shape", "attention_cost",
           "attention_crossover", "forward_flops_per_token", "matmul_params", "mfu", "palm_flops_per_token", "params", "resolve",
           "training_flops_per_token"]
