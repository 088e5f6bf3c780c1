"""The run plan: per stage, the GPUs it asks for, memory per GPU, fit, nodes, hours and cost.

    from dromedary_ray.config import load_config
    from dromedary_ray.plan.planner import build_plan
    plan = build_plan(load_config("configs/dromedary-65b.yaml"), cluster="cluster/aws.yaml")

The plan is derived from the config, never written back into it (STYLE.md §7). A phase that
does not fit carries a problem naming its stage and the shortfall; `Plan.fits` is true when no
phase has one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from dromedary_ray.plan import memory as mem
from dromedary_ray.plan import throughput as tp_model
from dromedary_ray.plan.cluster import Pool, load_pools, pool_for
from dromedary_ray.plan.specs import (
    GIB,
    GpuSpec,
    ModelShape,
    PlanError,
    gpu_spec,
    gpu_specs,
    resolve_shape,
)
from dromedary_ray.plan.stages import stage_kind
from dromedary_ray.plan.workload import Flow, GenWork, TrainWork, stage_work, train_section

MAX_NUM_SEQS = 256  # vLLM's default cap on the sequences an engine runs at once


@dataclass
class PhasePlan:
    stage: str
    phase: str  # generate | train
    request: str  # what the phase asks Ray for, in words
    gpus: int  # GPUs asked for (0: CPU only, not planned)
    gpu: str | None = None
    pool: str | None = None
    nodes: int | None = None
    max_nodes: int | None = None
    billed_gpus: int = 0  # GPUs paid for: whole nodes on a cluster, else those asked for
    memory: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by component
    usable: float = 0.0  # bytes per GPU the phase may use
    hours: float | None = None  # busy time
    gpu_hours: float | None = None  # billed GPUs x the time they are held
    cost: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def need(self) -> float:
        return sum(self.memory.values())


@dataclass
class StagePlan:
    stage: str
    kind: str
    work: list[str]
    phases: list[PhasePlan]
    concurrent: bool = False
    hours: float | None = None
    gpu_hours: float | None = None
    cost: float | None = None


@dataclass
class Plan:
    config: str
    recipe: str
    model: ModelShape
    gpu: str | None  # --gpu / plan.gpu when no cluster; the override with a cluster
    cluster: str | None
    pools: list[Pool]
    iterations: int
    stages: list[StagePlan]
    assumptions: list[str]
    hours: float | None = None
    gpu_hours: float | None = None
    cost: float | None = None

    @property
    def problems(self) -> list[str]:
        return [p for s in self.stages for ph in s.phases for p in ph.problems]

    @property
    def fits(self) -> bool:
        return not self.problems


def build_plan(config: Any, *, cluster: str | None = None, gpu: str | None = None,
               config_path: str = "") -> Plan:
    """Plan every stage of `config`'s recipe on `cluster`'s pools, or on `gpu` GPUs."""
    shape = resolve_shape(config.model, config.plan.model_shape)
    pools = load_pools(cluster, gpu) if cluster else []
    lone_gpu = None if cluster else _gpu_name(gpu or config.plan.gpu,
                                              "--gpu" if gpu else "plan.gpu")
    _check_prices(config.plan.price_per_gpu_hour)
    flow = Flow(prompts=config.plan.prompts or 0)
    stages = []
    for name in config.stages:
        kind = stage_kind(name)
        work = stage_work(name, config, flow)
        flow = work.flow
        phases = []
        if work.gen is not None:
            phases.append(_generation(name, _rollout_view(name, config), shape, work.gen,
                                      pools, lone_gpu))
        if work.score is not None:
            phases.append(_scoring(name, config, shape, work.score, pools, lone_gpu))
        if work.train is not None:
            phases.append(_training(name, config, shape, work.train, pools, lone_gpu))
        notes = [w.source for w in (work.gen, work.score, work.train) if w is not None]
        label = "+".join(p.phase for p in phases) or "driver"
        stage = StagePlan(name, label, notes or ["runs in the driver, no GPU"], phases,
                          concurrent=kind.concurrent)
        _cost_stage(stage, config.plan.price_per_gpu_hour)
        stages.append(stage)
    iterations = _iterations(config)
    plan = Plan(config_path, config.recipe, shape, pools[0].gpu if gpu and pools else lone_gpu,
                cluster, pools, iterations, stages, assumptions(config, shape))
    _total(plan)
    return plan


def _gpu_name(name: str, key: str) -> str:
    try:
        return gpu_spec(name).name
    except PlanError as err:
        raise PlanError(f"{key}: {err}") from None


def _iterations(config: Any) -> int:
    from dromedary_ray import config as config_module

    iterated = getattr(config_module, "ITERATED_RECIPES", ())
    if config.recipe in iterated:
        return int(getattr(getattr(config, config.recipe, None), "iterations", 1))
    return 1


# --- generation ------------------------------------------------------------------------------


def _with_engine(config: Any, engine: Any) -> Any:
    """`config` with another `engine` section (a run config, or a test's namespace)."""
    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, engine=engine)
    return SimpleNamespace(**{**vars(config), "engine": engine})


def _rollout_view(stage: str, config: Any) -> Any:
    """PPO's rollouts run `ppo.rollout_engines` engines (when set), not the generation
    stages' count: the rollout pool is held for the whole stage, beside the trainers."""
    count = getattr(getattr(config, stage, None), "rollout_engines", None) \
        if stage == "ppo" else None
    if count is None:
        return config
    return _with_engine(config, dataclasses.replace(config.engine, num_engines=count))


def _scoring(stage: str, config: Any, shape: ModelShape, work: GenWork, pools: list[Pool],
             lone_gpu: str | None) -> PhasePlan:
    """PPO's reward model: one engine (vLLM's pooling runner) with a generation engine's
    GPUs and tensor parallelism, one forward per rollout. Planned as a one-engine generation
    phase whose answers are one token long: weights, workspace and one sequence's KV cache."""
    one = _with_engine(config, dataclasses.replace(config.engine, num_engines=1))
    phase = _generation(stage, one, shape, work, pools, lone_gpu)
    phase.phase = "score"
    phase.request = "reward model: " + phase.request
    phase.problems = [p.replace("(generate)", "(score)") for p in phase.problems]
    return phase


def _generation(stage: str, config: Any, shape: ModelShape, work: GenWork, pools: list[Pool],
                lone_gpu: str | None) -> PhasePlan:
    eng = config.engine
    tp = eng.tensor_parallel_size
    per_engine = max(tp, math.ceil(eng.gpus_per_engine)) if eng.gpus_per_engine > 0 else 0
    engines = f"{eng.num_engines} engine{'s' if eng.num_engines > 1 else ''}"
    phase = PhasePlan(stage, "generate", f"{engines} x TP{tp}",
                      gpus=eng.num_engines * per_engine)
    if per_engine == 0:
        phase.request += " on CPU"
        phase.detail["note"] = "CPU engines (engine.gpus_per_engine 0): not planned"
        return phase
    if 0 < eng.gpus_per_engine < tp:
        phase.problems.append(f"stage {stage} (generate): engine.gpus_per_engine "
                              f"{eng.gpus_per_engine} is below tensor_parallel_size {tp}")
    gpu = _place(phase, pools, lone_gpu, "generate", eng.num_engines, per_engine,
                 eng.cpus_per_engine)
    _generation_memory(phase, config, shape, work, gpu)
    if not phase.problems:
        _generation_time(phase, config, shape, work, gpu)
    return phase


def _generation_memory(phase: PhasePlan, config: Any, shape: ModelShape, work: GenWork,
                       gpu: GpuSpec) -> None:
    eng = config.engine
    tp, dtype = eng.tensor_parallel_size, mem.DTYPE_BYTES[eng.dtype]
    phase.usable = eng.gpu_memory_utilization * gpu.memory_bytes
    weights = mem.weights_per_gpu(shape.params, dtype, tp)
    workspace = mem.VLLM_WORKSPACE_GIB * GIB
    kv_token = mem.kv_cache_per_gpu(layers=shape.layers, kv_heads=shape.kv_heads,
                                    head_dim=shape.head_dim, dtype_bytes=dtype, context=1,
                                    sequences=1, tp=tp)
    budget = phase.usable - weights - workspace
    context = min(eng.max_model_len, work.prompt_tokens + work.new_tokens)
    shared = min(work.shared_prefix, context - 1)
    unique = context - shared
    capacity = int((budget - kv_token * shared) // (kv_token * unique)) if budget > 0 else 0
    per_engine = math.ceil(work.requests / eng.num_engines)
    in_flight = eng.batch_size * eng.batches_in_flight  # rows an engine is given at once
    seqs = max(0, min(in_flight, MAX_NUM_SEQS, capacity, per_engine))
    phase.detail.update(context=round(context), shared_prefix=round(shared), sequences=seqs,
                        kv_capacity_sequences=max(capacity, 0),
                        kv_bytes_per_token_per_gpu=kv_token)
    if work.prompt_tokens + work.new_tokens > eng.max_model_len:
        phase.detail["note"] = (f"prompt + answer ({work.prompt_tokens + work.new_tokens:,.0f} "
                                f"tokens) exceed max_model_len {eng.max_model_len}")
    # vLLM refuses to start unless one max_model_len sequence fits in the KV cache.
    if budget < kv_token * eng.max_model_len:
        phase.memory = {"weights": weights, "kv_cache": kv_token * eng.max_model_len,
                        "workspace": workspace}
        phase.problems.append(
            f"stage {phase.stage} (generate): needs {_gib(phase.need)} GiB per GPU (weights "
            f"{_gib(weights)} at TP{tp} + KV cache of one {eng.max_model_len}-token sequence "
            f"{_gib(kv_token * eng.max_model_len)} + workspace {_gib(workspace)}); {gpu.name} "
            f"at gpu_memory_utilization {eng.gpu_memory_utilization} gives {_gib(phase.usable)}"
            f": short by {_gib(phase.need - phase.usable)} GiB")
        return
    phase.memory = {"weights": weights, "kv_cache": kv_token * (shared + seqs * unique),
                    "workspace": workspace}


def _generation_time(phase: PhasePlan, config: Any, shape: ModelShape, work: GenWork,
                     gpu: GpuSpec) -> None:
    eng, plan = config.engine, config.plan
    tp, dtype = eng.tensor_parallel_size, mem.DTYPE_BYTES[eng.dtype]
    seqs = phase.detail["sequences"]
    if work.requests == 0 or seqs == 0:
        phase.hours = 0.0
        return
    # Prefill: the shared prefix once per engine (prefix cache), the rest once per request.
    tokens = (work.requests * (work.prompt_tokens - work.shared_prefix)
              + eng.num_engines * work.shared_prefix)
    prefill = tp_model.flops_seconds(tp_model.forward_flops(shape.params, tokens),
                                     gpus=eng.num_engines * tp, peak_tflops=gpu.bf16_tflops,
                                     mfu=plan.mfu)
    # Decode: attention reads each running sequence's whole context, shared blocks included.
    mean_context = min(eng.max_model_len, work.prompt_tokens + work.new_tokens / 2)
    kv_read = phase.detail["kv_bytes_per_token_per_gpu"] * tp * seqs * mean_context
    step = tp_model.decode_step(weight_bytes=shape.params * dtype, kv_bytes_read=kv_read, tp=tp,
                                bandwidth_gbs=gpu.bandwidth_gbs, efficiency=plan.decode_efficiency,
                                sequences=seqs)
    decode = work.requests * work.new_tokens / (eng.num_engines * step.tokens_per_second)
    phase.hours = (prefill + decode) / 3600
    phase.detail.update(prefill_hours=prefill / 3600, decode_hours=decode / 3600,
                        decode_step_ms=step.seconds * 1e3,
                        decode_tokens_per_s=eng.num_engines * step.tokens_per_second,
                        generated_tokens=work.requests * work.new_tokens)


# --- training --------------------------------------------------------------------------------


def _training(stage: str, config: Any, shape: ModelShape, work: TrainWork, pools: list[Pool],
              lone_gpu: str | None) -> PhasePlan:
    train = train_section(config, stage)
    n = train.num_workers
    method = f"LoRA r{train.lora_rank}" if train.method == "lora" else "full"
    workers = f"{n} worker{'s' if n > 1 else ''}"
    phase = PhasePlan(stage, "train", f"{workers} x 1 GPU, {method}, ZeRO-{train.zero_stage}",
                      gpus=n if train.use_gpu else 0)
    if not train.use_gpu:
        phase.request = f"{workers} on CPU, {method}"
        phase.detail["note"] = "CPU workers (train.use_gpu false): not planned"
        return phase
    gpu = _place(phase, pools, lone_gpu, "train", n, 1, train.cpus_per_worker)
    concurrent = stage_kind(stage).concurrent
    phase.memory = training_memory(shape, train, ppo=concurrent)
    phase.usable = (1 - config.plan.train_headroom) * gpu.memory_bytes
    if phase.need > phase.usable:
        phase.problems.append(
            f"stage {stage} (train): needs {_gib(phase.need)} GiB per GPU ({method}, {workers}"
            f", ZeRO-{train.zero_stage}: {_breakdown(phase.memory)}); {gpu.name} gives "
            f"{_gib(phase.usable)} ({1 - config.plan.train_headroom:.0%} of "
            f"{gpu.memory_gib:g}): short by {_gib(phase.need - phase.usable)} GiB")
        return phase
    tokens = work.examples * work.tokens_per_example * work.epochs
    if work.max_steps is not None:
        per_step = n * train.micro_batch_size * train.gradient_accumulation_steps
        tokens = min(tokens, work.max_steps * per_step * work.tokens_per_example)
    lora = train.method == "lora"
    flops = tp_model.training_flops(shape.params, tokens, lora=lora,
                                    checkpointing=train.gradient_checkpointing)
    if concurrent:
        # PPO: policy and value trained each epoch; one forward each of the old policy, the
        # reference and the old values per rollout (the reward model is the score phase's).
        once = tokens / max(work.epochs, 1)
        flops = 2 * flops + 3 * tp_model.forward_flops(shape.params, once)
    seconds = tp_model.flops_seconds(flops, gpus=n, peak_tflops=gpu.bf16_tflops,
                                     mfu=config.plan.mfu)
    phase.hours = seconds / 3600
    phase.detail.update(train_tokens=tokens, train_flops=flops)
    return phase


def training_memory(shape: ModelShape, train: Any, *, ppo: bool = False) -> dict[str, float]:
    """Bytes per GPU of one Ray Train worker (ZeRO over `num_workers` GPUs).

    PPO's trainer group holds a trained policy and value model; full fine-tuning adds a frozen
    reference (partitioned like the rest), LoRA reads the reference from the policy's base with
    its adapter off. The reward model scores in its own engine (the score phase).
    """
    n, stage, bf16 = train.num_workers, train.zero_stage, train.bf16
    lora = train.method == "lora"
    adapters = mem.lora_params(layers=shape.layers, rank=train.lora_rank, hidden=shape.hidden,
                               kv_dim=shape.kv_dim, intermediate=shape.intermediate,
                               targets=tuple(train.lora_target_modules)) if lora else 0
    trainable = adapters if lora else shape.params
    states = mem.zero_model_states(shape.params + adapters, n, stage=stage, bf16=bf16,
                                   trainable_params=trainable if lora else None,
                                   offload_optimizer=bool(getattr(train, "offload_optimizer",
                                                                  False)),
                                   offload_params=bool(getattr(train, "offload_params", False)))
    copies = 2 if ppo else 1
    p_bytes = 2 if bf16 else 4
    acts = mem.training_activations(layers=shape.layers, hidden=shape.hidden, kv_dim=shape.kv_dim,
                                    intermediate=shape.intermediate, vocab=shape.vocab,
                                    micro_batch=train.micro_batch_size, seq_len=train.max_seq_len,
                                    checkpointing=train.gradient_checkpointing)
    out = {
        "weights": copies * states.params,
        "gradients": copies * states.grads,
        "optimizer": copies * states.optimizer,
        "optimizer_step": mem.optimizer_step_buffer(trainable, n, stage, bf16),
        "gathered_layers": mem.gathered_params(shape.block_params, stage) * p_bytes / 2,
        "activations": acts["activations"] * p_bytes / 2,
        "logits": acts["logits"],
    }
    if ppo and not lora:
        out["frozen_reference"] = p_bytes * shape.params / (n if stage == 3 else 1)
    return out


# --- placement and cost ----------------------------------------------------------------------


def _place(phase: PhasePlan, pools: list[Pool], lone_gpu: str | None, role: str, units: int,
           gpus_per_unit: int, cpus_per_unit: float) -> GpuSpec:
    """Choose the pool (the first of the role's pools that holds the phase), count nodes."""
    if not pools:
        phase.gpu, phase.billed_gpus = lone_gpu, units * gpus_per_unit
        return gpu_spec(lone_gpu or "")
    candidates = pool_for(pools, role)
    if not candidates:
        raise PlanError(f"stage {phase.stage} ({role}): the cluster has no pool for it")
    tries = []
    for pool in candidates:
        problems = []
        per_node = min(pool.gpus_per_node // gpus_per_unit,
                       int(pool.cpus_per_node // cpus_per_unit) if cpus_per_unit else units)
        if per_node == 0:
            problems.append(f"stage {phase.stage} ({role}): one unit needs {gpus_per_unit} GPUs "
                            f"and {cpus_per_unit:g} CPUs, a node of pool {pool.name} has "
                            f"{pool.gpus_per_node} and {pool.cpus_per_node:g}")
            nodes = 0
        else:
            nodes = math.ceil(units / per_node)
            if nodes > pool.max_nodes:
                problems.append(f"stage {phase.stage} ({role}): needs {nodes} nodes of pool "
                                f"{pool.name} ({per_node} per node), which scales to "
                                f"{pool.max_nodes}: short by {nodes - pool.max_nodes} nodes")
        tries.append((pool, nodes, problems))
        if not problems:
            break
    pool, nodes, problems = next((t for t in tries if not t[2]), tries[0])
    phase.pool, phase.gpu, phase.nodes, phase.max_nodes = pool.name, pool.gpu, nodes, pool.max_nodes
    phase.billed_gpus = nodes * pool.gpus_per_node
    phase.problems.extend(problems)
    return gpu_spec(pool.gpu or "")


def _check_prices(prices: dict[str, float]) -> None:
    known = gpu_specs()
    for name in prices:
        if name != "default" and name not in known:
            raise PlanError(f"plan.price_per_gpu_hour.{name}: unknown GPU type; known: "
                            f"{', '.join(known)} (or default)")


def _price(prices: dict[str, float], gpu: str | None) -> float | None:
    if gpu is None:
        return None
    return prices.get(gpu, prices.get("default"))


def _cost_stage(stage: StagePlan, prices: dict[str, float]) -> None:
    timed = [p for p in stage.phases if p.gpus]
    if not timed or any(p.hours is None for p in timed):
        return
    stage.hours = sum(p.hours or 0.0 for p in timed)
    for p in timed:
        # PPO alternates rollouts and updates, holding both groups throughout.
        p.gpu_hours = p.billed_gpus * (stage.hours if stage.concurrent else p.hours or 0.0)
        price = _price(prices, p.gpu)
        p.cost = None if price is None else p.gpu_hours * price
    stage.gpu_hours = sum(p.gpu_hours or 0.0 for p in timed)
    if all(p.cost is not None for p in timed):
        stage.cost = sum(p.cost or 0.0 for p in timed)


def _total(plan: Plan) -> None:
    """Run totals, when every GPU phase was timed (a phase that does not fit is not)."""
    k = plan.iterations
    timed = [s for s in plan.stages if any(p.gpus for p in s.phases)]
    if not timed or any(s.hours is None for s in timed):
        return
    plan.hours = k * sum(s.hours or 0.0 for s in timed)
    plan.gpu_hours = k * sum(s.gpu_hours or 0.0 for s in timed)
    if all(s.cost is not None for s in timed):
        plan.cost = k * sum(s.cost or 0.0 for s in timed)


def assumptions(config: Any, shape: ModelShape) -> list[str]:
    p = config.plan
    return [
        f"model {shape.name}: {shape.params / 1e9:.1f}e9 parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}, {shape.heads} heads ({shape.kv_heads} KV heads of "
        f"{shape.head_dim}), vocab {shape.vocab}",
        "memory in GiB (2^30 bytes), per GPU",
        "training, bf16: 2 B weights + 2 B gradients + 12 B Adam (fp32 master, m, v) per "
        "trainable parameter, partitioned over the workers by the ZeRO stage; LoRA: frozen "
        "base weights partitioned, adapter states as above; + fp32 gradients of one optimizer "
        "sub-group (<= 1e9 params) in the step; + 2 gathered layers (ZeRO-3 prefetch)",
        "training activations: bf16, per token and layer 6h + 2kv + 4i values (flash/SDPA "
        "attention); with gradient checkpointing only each layer's input (h) plus one layer; "
        "logits 10 B per token per vocabulary entry; micro-batch x max_seq_len tokens",
        f"training leaves {p.train_headroom:.0%} of each GPU free (CUDA context, NCCL "
        "buffers, fragmentation)",
        "vLLM: gpu_memory_utilization x GPU memory holds weights/TP + 2 GiB workspace + KV "
        "cache (2 x layers x kv_heads x head_dim x bytes per token, split over TP); a stage "
        "fits when one max_model_len sequence fits (vLLM's start-up check); running sequences "
        f"= min(batch_size x batches_in_flight, {MAX_NUM_SEQS}, what the KV cache holds); a "
        "prefix-cached shared "
        "prompt prefix is stored once",
        f"decode: each step reads the weights once plus every running sequence's KV cache at "
        f"{p.decode_efficiency:.0%} of peak memory bandwidth",
        f"prefill and training: FLOPs at {p.mfu:.0%} MFU of dense bf16 peak; forward 2·P·tokens,"
        " training 6·P·tokens (LoRA 4), + 2·P·tokens with gradient checkpointing; attention "
        "FLOPs and communication not counted",
        f"work: generation stages keep {p.keep_fraction:.0%} of their rows; every answer runs "
        f"to max_new_tokens; a query is {p.query_tokens} tokens; training examples are query + "
        "answer, capped at max_seq_len",
        "cost: whole nodes are billed on a cluster (requested GPUs without one); stages run one "
        "after another, each holding its pool only while it runs",
    ]


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f}"


def _breakdown(memory: dict[str, float]) -> str:
    return ", ".join(f"{k} {_gib(v)}" for k, v in memory.items() if v >= 0.05 * GIB)
