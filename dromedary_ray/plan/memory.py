"""Memory per GPU, by arithmetic: ZeRO model states, training activations, vLLM weights + KV.

Everything is in bytes; callers convert. Pure functions over numbers, no torch or DeepSpeed, so
the hand-computed cases in tests/test_plan.py check them directly.

Mixed-precision Adam (ZeRO paper, Rajbhandari et al. 2020, §3.1): per trainable parameter 2 B of
bf16 weights, 2 B of bf16 gradients and 12 B of fp32 optimizer state (master copy, momentum,
variance) = 16 B. ZeRO stage 1 partitions the optimizer state over the data-parallel workers,
stage 2 the gradients too, stage 3 the weights too. DeepSpeed's own estimator counts 4 B of
gradients (an fp32 gradient partition); with bf16, DeepSpeed 0.19 keeps the gradient partition in
the model's dtype and makes fp32 gradients for one optimizer sub-group at a time
(`sub_group_size`, 1e9 parameters), which `optimizer_step_buffer` counts separately.
"""

from __future__ import annotations

from dataclasses import dataclass

SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default zero_optimization.sub_group_size
VLLM_WORKSPACE_GIB = 2.0  # activations of a prefill chunk + CUDA graphs, per GPU, outside KV
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


@dataclass(frozen=True)
class ZeroStates:
    """Model states per GPU (on the GPU) and per node (offloaded to host memory)."""

    params: float
    grads: float
    optimizer: float
    cpu_per_node: float

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer


def zero_model_states(total_params: float, num_gpus: int, *, trainable_params: float | None = None,
                      stage: int = 3, gpus_per_node: int | None = None, bf16: bool = True,
                      grad_bytes: float | None = None, offload_optimizer: bool = False,
                      offload_params: bool = False) -> ZeroStates:
    """Weights, gradients and Adam state per GPU for data-parallel training under ZeRO.

    `trainable_params` (default: all) carry gradients and optimizer state; the rest (a LoRA
    model's frozen base) carry weights only. Stage s partitions optimizer state (s >= 1),
    gradients (s >= 2) and weights (s = 3) evenly over `num_gpus`. Offloading the optimizer
    (ZeRO-Offload) moves gradients and optimizer state to host memory; offloading the
    parameters (ZeRO-Infinity, stage 3 only) moves the weights too.
    """
    trainable = total_params if trainable_params is None else trainable_params
    p_bytes = 2 if bf16 else 4
    g_bytes = grad_bytes if grad_bytes is not None else p_bytes
    o_bytes = 12 if bf16 else 8  # fp32 master + m + v; pure fp32 has no separate master copy
    n = num_gpus
    params = p_bytes * total_params / (n if stage == 3 else 1)
    grads = g_bytes * trainable / (n if stage >= 2 else 1)
    optimizer = o_bytes * trainable / (n if stage >= 1 else 1)
    per_node = gpus_per_node or n
    cpu = 0.0
    if offload_optimizer or offload_params:
        cpu += (grads + optimizer) * per_node
        grads = optimizer = 0.0
    if offload_params and stage == 3:
        cpu += params * per_node
        params = 0.0
    return ZeroStates(params, grads, optimizer, cpu)


def optimizer_step_buffer(trainable_params: float, num_gpus: int, stage: int = 3,
                          bf16: bool = True) -> float:
    """fp32 gradients of one optimizer sub-group, made during the step (bf16 training only)."""
    if not bf16:
        return 0.0
    local = trainable_params / (num_gpus if stage >= 1 else 1)
    return 4.0 * min(local, SUB_GROUP_SIZE)


def gathered_params(block_params: float, stage: int = 3, prefetch_depth: int = 2) -> float:
    """Full bf16 weights of the layers ZeRO-3 has gathered: the one computing + the prefetched."""
    return 2.0 * block_params * prefetch_depth if stage == 3 else 0.0


def layer_activation_bytes_per_token(hidden: int, kv_dim: int, intermediate: int) -> float:
    """bf16 tensors autograd keeps for one decoder layer, per token.

    Attention norm input and output (2h), q, k, v after rotary (h + 2 kv), attention output (h),
    MLP norm input and output (2h), gate, up, act(gate) and act(gate)*up (4 i): 6h + 2kv + 4i
    elements of 2 bytes. Flash/SDPA attention keeps no seq x seq score matrix.
    """
    return 2.0 * (6 * hidden + 2 * kv_dim + 4 * intermediate)


def training_activations(*, layers: int, hidden: int, kv_dim: int, intermediate: int, vocab: int,
                         micro_batch: int, seq_len: int, checkpointing: bool) -> dict[str, float]:
    """Activation memory of one micro-batch on one GPU.

    With gradient checkpointing only each layer's bf16 input is kept (2h per token per layer),
    plus one layer's full activations while it is recomputed in the backward pass. Logits cost
    10 B each: bf16 logits, the fp32 copy the loss takes, and its fp32 log-softmax.
    """
    tokens = micro_batch * seq_len
    layer = layer_activation_bytes_per_token(hidden, kv_dim, intermediate) * tokens
    if checkpointing:
        kept = layers * 2.0 * hidden * tokens + layer
    else:
        kept = layers * layer
    return {"activations": kept, "logits": 10.0 * tokens * vocab}


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> float:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x bytes."""
    return 2.0 * layers * kv_heads * head_dim * dtype_bytes


def kv_cache_per_gpu(*, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                     context: int, sequences: int, tp: int) -> float:
    """KV cache of `sequences` sequences of `context` tokens on one GPU of a TP group.

    Tensor parallelism splits the KV heads over the TP GPUs; when TP exceeds the KV heads (GQA
    models at high TP), each GPU keeps a whole head, so the split stops at kv_heads.
    """
    per_gpu_heads = max(kv_heads / tp, 1.0)
    return 2.0 * layers * per_gpu_heads * head_dim * dtype_bytes * context * sequences


def weights_per_gpu(params: float, dtype_bytes: int, tp: int) -> float:
    return params * dtype_bytes / tp


def lora_params(*, layers: int, rank: int, hidden: int, kv_dim: int, intermediate: int,
                targets: tuple[str, ...]) -> int:
    """Adapter parameters: rank x (fan_in + fan_out) per targeted linear per layer."""
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv_dim), "v_proj": (hidden, kv_dim),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate),
              "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target module {unknown[0]!r}; known: {', '.join(shapes)}")
    return layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
