"""Duration by throughput models: decoding bound by memory bandwidth, the rest by FLOPs.

Decoding (one token per running sequence per step): each step reads the engine's weights once
for the whole batch, plus every running sequence's KV cache, from HBM. Prefill and training are
matrix multiplications bound by FLOPs: a forward pass is 2 FLOPs per parameter per token,
training 6 (forward 2, backward 4; Kaplan et al. 2020), LoRA 4 (no weight gradients for the
frozen base), and gradient checkpointing adds a second forward (2). Attention's own FLOPs and
communication are left out; `mfu` and `decode_efficiency` are where such losses go.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeStep:
    seconds: float
    tokens_per_second: float  # per engine


def decode_step(*, weight_bytes: float, kv_bytes_read: float, tp: int, bandwidth_gbs: float,
                efficiency: float, sequences: int) -> DecodeStep:
    """One decode step of an engine of `tp` GPUs running `sequences` sequences.

    `weight_bytes` and `kv_bytes_read` are the engine's totals; the TP GPUs read their shards in
    parallel, each at `efficiency` x its peak bandwidth.
    """
    seconds = (weight_bytes + kv_bytes_read) / (tp * bandwidth_gbs * 1e9 * efficiency)
    return DecodeStep(seconds, sequences / seconds)


def forward_flops(params: float, tokens: float) -> float:
    return 2.0 * params * tokens


def training_flops(params: float, tokens: float, *, lora: bool, checkpointing: bool) -> float:
    """6 P T for full fine-tuning, 4 P T for LoRA, + 2 P T for the recomputed forward."""
    per_token = (4.0 if lora else 6.0) + (2.0 if checkpointing else 0.0)
    return per_token * params * tokens


def flops_seconds(flops: float, *, gpus: int, peak_tflops: float, mfu: float) -> float:
    return flops / (gpus * peak_tflops * 1e12 * mfu)
