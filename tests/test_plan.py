"""The run planner (`dromedary plan`): hand-computed memory, DeepSpeed's estimator, shipped
configs on the shipped clusters, the command line. No Ray, no GPU; milliseconds each (the
DeepSpeed comparison imports deepspeed, a few seconds once)."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from dromedary_ray.cli import main
from dromedary_ray.config import (
    PROJECT_ROOT,
    EngineConfig,
    PlanConfig,
    PPOConfig,
    PPOLoRAConfig,
    SamplingConfig,
    SeedsConfig,
    TrainConfig,
    load_config,
)
from dromedary_ray.errors import ConfigError
from dromedary_ray.plan import memory as mem
from dromedary_ray.plan import throughput as tp_model
from dromedary_ray.plan.cluster import load_pools
from dromedary_ray.plan.planner import build_plan, training_memory
from dromedary_ray.plan.specs import (
    GIB,
    PlanError,
    gpu_spec,
    model_shapes,
    resolve_shape,
    shape_from_hf_config,
)
from dromedary_ray.plan.stages import stage_kind

CONFIGS = PROJECT_ROOT / "configs"
CLUSTERS = [PROJECT_ROOT / "cluster" / "aws.yaml", PROJECT_ROOT / "cluster" / "gcp.yaml"]
PAPER_CONFIGS = sorted(p for pattern in ("*-65b.yaml", "*-70b.yaml", "*-72b.yaml")
                       for p in CONFIGS.glob(pattern))
LLAMA_7B = 6_738_415_616


# --- data files ------------------------------------------------------------------------------


def test_every_shape_in_models_yaml_adds_up_to_its_parameter_count():
    shapes = model_shapes()
    assert {"llama-7b", "llama-13b", "llama-65b", "llama-2-70b", "qwen2-72b", "smollm2-135m",
            "tiny-llama"} <= set(shapes)
    for shape in shapes.values():
        assert shape.computed_params() == shape.params, shape.name
    assert shapes["llama-2-70b"].kv_heads == 8 and shapes["llama-65b"].kv_heads == 64


def test_gpu_specs_are_datasheet_numbers():
    h100, a100 = gpu_spec("H100-80GB"), gpu_spec("nvidia-a100-80gb")  # names and aliases
    assert (h100.bandwidth_gbs, h100.bf16_tflops) == (3350, 989)
    assert (a100.name, a100.memory_gib, a100.bandwidth_gbs, a100.bf16_tflops) == \
        ("A100-80GB", 80.0, 2039, 312)
    assert {"A100-40GB", "H200", "L4", "A10G"} <= {gpu_spec(n).name
                                                   for n in ("A100-40GB", "H200", "L4", "A10G")}
    with pytest.raises(PlanError, match="unknown GPU type 'B300'"):
        gpu_spec("B300")


def test_model_specs_map_to_shapes(tmp_path):
    assert resolve_shape("/mnt/models/llama-65b-hf").name == "llama-65b"
    assert resolve_shape("meta-llama/Llama-2-70b-hf").name == "llama-2-70b"
    assert resolve_shape("builtin:smollm2-135m").name == "smollm2-135m"
    assert resolve_shape("/mnt/models/whatever", override="qwen2-72b").name == "qwen2-72b"
    with pytest.raises(PlanError, match="plan.model_shape"):
        resolve_shape("/mnt/models/mystery-model")
    # A local Hugging Face folder: its config.json, parameters counted from the shape.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "vocab_size": 49152, "max_position_embeddings": 4096, "tie_word_embeddings": True}))
    assert resolve_shape(str(tmp_path)).params == model_shapes()["tiny-llama"].params
    assert shape_from_hf_config(tmp_path / "config.json").kv_dim == 128


def test_pools_come_from_the_autoscaler_files():
    pools = {p.name: p for p in load_pools(CLUSTERS[0])}
    assert set(pools) == {"gpu_generation", "gpu_training"}  # the head and CPU pool have no GPU
    gen, train = pools["gpu_generation"], pools["gpu_training"]
    assert (gen.gpu, gen.gpus_per_node, gen.max_nodes, gen.role) == ("A100-80GB", 8, 8, "generate")
    assert (train.gpu, train.gpus_per_node, train.max_nodes, train.role) == \
        ("H100-80GB", 8, 4, "train")
    assert {p.gpu for p in load_pools(CLUSTERS[1], gpu_override="H200")} == {"H200"}


# --- memory by hand --------------------------------------------------------------------------


def test_7b_bf16_zero3_on_8_gpus_by_hand():
    # 6,738,415,616 parameters over 8 GPUs: 842,301,952 each.
    # bf16 weights 2 B, bf16 gradients 2 B, Adam fp32 master + m + v 12 B.
    states = mem.zero_model_states(LLAMA_7B, 8)
    assert states.params == 1_684_603_904  # 2 x 842,301,952
    assert states.grads == 1_684_603_904
    assert states.optimizer == 10_107_623_424  # 12 x 842,301,952
    assert states.gpu_total == 13_476_831_232  # 16 x 842,301,952 = 12.55 GiB
    assert states.cpu_per_node == 0
    # ZeRO-Offload: gradients and optimizer state go to host memory, 8 GPUs' worth per node.
    off = mem.zero_model_states(LLAMA_7B, 8, offload_optimizer=True)
    assert (off.params, off.grads, off.optimizer) == (1_684_603_904, 0, 0)
    assert off.cpu_per_node == 14 * LLAMA_7B
    # ZeRO-2 keeps whole weights on every GPU, partitions the rest.
    z2 = mem.zero_model_states(LLAMA_7B, 8, stage=2)
    assert z2.params == 2 * LLAMA_7B and z2.grads == 1_684_603_904


def test_7b_full_fine_tune_per_gpu_by_hand():
    shape = model_shapes()["llama-7b"]
    train = TrainConfig(method="full", num_workers=8, use_gpu=True, bf16=True, micro_batch_size=1,
                        max_seq_len=2048, gradient_checkpointing=True)
    m = training_memory(shape, train)
    assert m["weights"] + m["gradients"] + m["optimizer"] == 13_476_831_232
    assert m["optimizer_step"] == 4 * 842_301_952  # fp32 grads of the (one) sub-group
    # Two gathered decoder layers of 202,383,360 parameters in bf16.
    assert m["gathered_layers"] == 2 * 2 * 202_383_360
    # Checkpointed: each layer's input, 32 layers x 4,096 x 2 B x 2,048 tokens = 536,870,912,
    # plus one layer's full activations, 2 B x (6 x 4,096 + 2 x 4,096 + 4 x 11,008) = 153,600 B
    # per token x 2,048 = 314,572,800.
    assert m["activations"] == 536_870_912 + 314_572_800
    assert m["logits"] == 10 * 2048 * 32000  # 655,360,000
    total = 13_476_831_232 + 3_369_207_808 + 809_533_440 + 851_443_712 + 655_360_000
    assert sum(m.values()) == total == 19_162_376_192  # 17.85 GiB


def test_lora_adapters_of_65b_match_the_cluster_readme():
    shape = model_shapes()["llama-65b"]
    n = mem.lora_params(layers=80, rank=16, hidden=8192, kv_dim=shape.kv_dim,
                        intermediate=shape.intermediate,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert n == 16 * (8192 + 8192) * 4 * 80 == 83_886_080  # "83.9M parameters"


def test_kv_cache_of_llama2_70b_by_hand():
    shape = model_shapes()["llama-2-70b"]
    # 2 (K, V) x 80 layers x 8 KV heads x 128 x 2 B = 327,680 B per token.
    assert mem.kv_bytes_per_token(shape.layers, shape.kv_heads, shape.head_dim) == 327_680
    # 32 sequences of 4,096 tokens: 327,680 x 4,096 x 32 = 42,949,672,960 B = 40 GiB.
    kw = dict(layers=80, kv_heads=8, head_dim=128, dtype_bytes=2, context=4096, sequences=32)
    assert mem.kv_cache_per_gpu(**kw, tp=1) == 42_949_672_960 == 40 * GIB
    assert mem.kv_cache_per_gpu(**kw, tp=4) == 10 * GIB  # two KV heads per GPU
    # At TP16 each GPU still keeps a whole KV head: 8 heads cannot split 16 ways.
    assert mem.kv_cache_per_gpu(**kw, tp=16) == 5 * GIB


def test_throughput_arithmetic_by_hand():
    # One decode step of LLaMA-65B in bf16 on TP4 A100-80GB at full bandwidth, no KV:
    # 130.57 GB / (4 x 2,039 GB/s) = 16.0 ms.
    step = tp_model.decode_step(weight_bytes=2 * 65_285_660_672, kv_bytes_read=0, tp=4,
                                bandwidth_gbs=2039, efficiency=1.0, sequences=32)
    assert step.seconds == pytest.approx(2 * 65_285_660_672 / (4 * 2039e9))
    assert step.tokens_per_second == pytest.approx(32 / step.seconds)
    assert tp_model.training_flops(7e9, 1e9, lora=False, checkpointing=False) == 6 * 7e9 * 1e9
    assert tp_model.training_flops(7e9, 1e9, lora=True, checkpointing=True) == 6 * 7e9 * 1e9
    # 6 P T for 7B on 1e9 tokens at 40% of 8 x 989 TFLOPS: 4.2e19 / 3.1648e15 = 13,271 s.
    assert tp_model.flops_seconds(4.2e19, gpus=8, peak_tflops=989, mfu=0.4) == \
        pytest.approx(13_271.0, rel=1e-4)


# --- agreement with DeepSpeed's own estimator ------------------------------------------------


@pytest.mark.parametrize("name", ["llama-7b", "llama-65b", "llama-2-70b"])
@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("offload", ["none", "optimizer", "optimizer+params"])
def test_zero3_states_agree_with_deepspeed_estimator(name, nodes, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = model_shapes()[name]
    gpus_per_node, buffer_factor = 8, 1.5
    largest = shape.largest_module_params
    cpu_offload = offload != "none"
    cpu_params = offload == "optimizer+params"
    ds_cpu, ds_gpu, ds_layer = estimate_zero3_model_states_mem_needs(
        total_params=shape.params, largest_layer_params=largest,
        num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=cpu_offload,
        cpu_offload_params=cpu_params, zero_init=True, additional_buffer_factor=buffer_factor)
    # DeepSpeed's assumptions: fp32 gradient partition (4 B), and 4 B per parameter of the
    # largest layer for the gathered working set.
    ours = mem.zero_model_states(shape.params, gpus_per_node * nodes, grad_bytes=4,
                                 gpus_per_node=gpus_per_node, offload_optimizer=cpu_offload,
                                 offload_params=cpu_params)
    assert ds_layer == 4 * largest
    assert abs(ours.gpu_total + 4 * largest - ds_gpu) <= 1
    if cpu_offload:
        assert ours.cpu_per_node * buffer_factor == pytest.approx(ds_cpu, abs=1)


# --- plans of whole configs ------------------------------------------------------------------


def test_a_paper_scale_config_exists():
    assert PAPER_CONFIGS, "no configs/*-65b.yaml, *-70b.yaml or *-72b.yaml to plan"


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda p: p.name)
@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_scale_configs_fit_the_shipped_clusters(config, cluster):
    plan = build_plan(load_config(config), cluster=str(cluster))
    assert plan.fits, f"{config.name} on {cluster.name}:\n" + "\n".join(plan.problems)
    gpu_phases = [p for s in plan.stages for p in s.phases if p.gpus]
    assert gpu_phases and all(p.hours and p.hours > 0 for p in gpu_phases)


def test_dromedary_65b_plan_matches_its_config():
    plan = build_plan(load_config(CONFIGS / "dromedary-65b.yaml"), cluster=str(CLUSTERS[0]))
    phases = {(s.stage, p.phase): p for s in plan.stages for p in s.phases}
    gen = phases[("self_align", "generate")]
    assert (gen.gpus, gen.pool, gen.gpu, gen.nodes) == (64, "gpu_generation", "A100-80GB", 8)
    # LLaMA-65B bf16 over TP4: 65,285,660,672 x 2 / 4 B of weights per GPU.
    assert gen.memory["weights"] == 65_285_660_672 * 2 / 4
    assert gen.need <= gen.usable == 0.9 * 80 * GIB
    engrave = phases[("engrave", "train")]
    assert (engrave.gpus, engrave.pool, engrave.gpu, engrave.nodes) == \
        (16, "gpu_training", "H100-80GB", 2)
    assert engrave.memory["weights"] == pytest.approx(2 * (65_285_660_672 + 83_886_080) / 16)
    assert plan.cost is None and plan.hours > 0  # no prices in the config


def test_prices_give_costs_per_billed_node():
    overrides = ["plan.price_per_gpu_hour.A100-80GB=4", "plan.price_per_gpu_hour.default=10"]
    plan = build_plan(load_config(CONFIGS / "dromedary-65b.yaml", overrides),
                      cluster=str(CLUSTERS[0]))
    for stage in plan.stages:
        for p in stage.phases:
            price = 4 if p.gpu == "A100-80GB" else 10
            assert p.billed_gpus == p.nodes * 8
            assert p.cost == pytest.approx(p.billed_gpus * p.hours * price)
    assert plan.cost == pytest.approx(sum(s.cost for s in plan.stages))
    with pytest.raises(PlanError, match="price_per_gpu_hour.X9: unknown GPU type"):
        build_plan(load_config(CONFIGS / "dromedary-65b.yaml", ["plan.price_per_gpu_hour.X9=1"]))


def test_too_many_engines_for_the_pool_is_a_node_shortfall():
    config = load_config(CONFIGS / "dromedary-65b.yaml", ["engine.num_engines=20"])
    plan = build_plan(config, cluster=str(CLUSTERS[0]))
    assert not plan.fits
    assert any(p.startswith("stage self_align (generate): needs 10 nodes of pool gpu_generation")
               and "short by 2 nodes" in p for p in plan.problems)


def test_ppo_holds_rollout_engines_and_trainers_at_once():
    """A stand-in for SALMON's PPO section: rollout engines on one pool, trainers on the other,
    both billed for the whole stage."""
    config = SimpleNamespace(
        model="meta-llama/Llama-2-70b-hf", recipe="ppo_only", stages=("seeds", "ppo"),
        plan=PlanConfig(prompts=10_000), seeds=SeedsConfig(),
        engine=EngineConfig(dtype="bfloat16", tensor_parallel_size=4, gpus_per_engine=4,
                            in_process=False, num_engines=2, batch_size=64, max_model_len=1024),
        ppo=PPOConfig(steps=20, prompts_per_step=64, mini_batch_size=32, trainer="deepspeed",
                      trainer_workers=8, micro_batch_size=2, bf16=True,
                      gradient_checkpointing=True, lora=PPOLoRAConfig(rank=16),
                      sampling=SamplingConfig(max_new_tokens=256)))
    plan = build_plan(config, cluster=str(CLUSTERS[0]))
    assert plan.fits, plan.problems
    (stage,) = [s for s in plan.stages if s.stage == "ppo"]
    gen, score, train = stage.phases
    assert [p.phase for p in stage.phases] == ["generate", "score", "train"]
    assert (gen.pool, score.pool, train.pool) == ("gpu_generation", "gpu_generation",
                                                  "gpu_training")
    assert (gen.gpus, score.gpus, train.gpus) == (8, 4, 8)  # 2 TP4 rollouts, a TP4 RM, 8 ranks
    # Two frozen bases (policy/reference, value), each partitioned over 8 workers.
    # r16 adapters: q and o are 8,192 -> 8,192, k and v 8,192 -> 1,024 (8 KV heads of 128).
    adapters = 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024)) * 80
    assert adapters == 65_536_000
    assert train.memory["weights"] == pytest.approx(2 * 2 * (68_976_648_192 + adapters) / 8)
    assert "frozen_reference" not in train.memory  # LoRA: the base with its adapter off
    for p in stage.phases:
        assert p.gpu_hours == pytest.approx(p.billed_gpus * stage.hours)
    assert stage.hours == pytest.approx(gen.hours + score.hours + train.hours)
    # 20 x 64 rollouts of (30 chat + 48 query) + 256 tokens, two epochs.
    assert train.detail["train_tokens"] == 20 * 64 * (30 + 48 + 256) * 2
    full = training_memory(model_shapes()["llama-2-70b"],
                           dataclasses.replace(config.ppo, lora=None).train_config(config.engine),
                           ppo=True)
    assert full["frozen_reference"] == pytest.approx(2 * 68_976_648_192 / 8)  # bf16, ZeRO-3


def test_salmon_70b_plan_matches_its_config():
    config = load_config(CONFIGS / "salmon-70b.yaml")
    plan = build_plan(config, cluster=str(CLUSTERS[0]))
    assert plan.fits, plan.problems
    assert [s.stage for s in plan.stages] == list(config.stages)
    phases = {(s.stage, p.phase): p for s in plan.stages for p in s.phases}
    assert set(phases) >= {("preferences", "generate"), ("reward_model", "train"),
                           ("ppo", "generate"), ("ppo", "score"), ("ppo", "train")}
    train = phases[("ppo", "train")]
    assert train.gpus == config.ppo.trainer_workers == 16
    assert train.request == "16 workers x 1 GPU, LoRA r16, ZeRO-3"
    assert phases[("ppo", "generate")].gpus == config.ppo.rollout_engines * 4
    assert config.ppo.trainer == "deepspeed" and config.ppo.lora is not None


def test_every_recipe_stage_has_a_stage_kind_that_matches_its_config():
    """The planner's table covers every stage a recipe can run, and a training stage's config
    section gives the planner a TrainConfig (a `train` block, or PPO's derived one)."""
    from dromedary_ray.config import RECIPES, RunConfig
    from dromedary_ray.plan.workload import train_section

    config = RunConfig()
    for recipe, stages in RECIPES.items():
        for stage in stages:
            kind = stage_kind(stage)
            if kind.train:
                assert isinstance(train_section(config, stage), TrainConfig), (recipe, stage)
    assert stage_kind("ppo").concurrent and stage_kind("ppo").generate


def test_unknown_stage_is_an_error_naming_it():
    with pytest.raises(PlanError, match="stage 'distill'.*STAGE_KINDS"):
        stage_kind("distill")


def test_plan_config_is_validated():
    with pytest.raises(ConfigError, match=r"^plan\.price_per_gpu_hour\.L4: must be a price"):
        load_config(CONFIGS / "local.yaml", ["plan.price_per_gpu_hour.L4=-1"])
    with pytest.raises(ConfigError, match=r"^plan\.mfu: must be in \(0, 1\]"):
        load_config(CONFIGS / "local.yaml", ["plan.mfu=1.5"])
    with pytest.raises(PlanError, match="^plan.gpu: unknown GPU type"):
        build_plan(load_config(CONFIGS / "local.yaml", ["plan.gpu=V100"]))


# --- the command -----------------------------------------------------------------------------


def test_plan_command_prints_a_table(capsys):
    rc = main(["plan", str(CONFIGS / "dromedary-65b.yaml"), "--cluster", str(CLUSTERS[0])])
    out = capsys.readouterr().out
    assert rc == 0
    header = next(line for line in out.splitlines() if line.startswith("stage "))
    assert header.split() == ["stage", "phase", "request", "pool", "/", "GPU", "nodes",
                              "GiB/GPU", "fits", "hours", "GPU-h", "cost"]
    for stage in ("synthesize", "self_align", "engrave", "verbose_clone", "total"):
        assert any(line.startswith(stage) for line in out.splitlines()), stage
    assert "assumptions" in out and "MFU" in out and "DOES NOT FIT" not in out


def test_plan_command_json(capsys):
    rc = main(["plan", str(CONFIGS / "dromedary-65b.yaml"), "--cluster", str(CLUSTERS[1]),
               "--json", "plan.price_per_gpu_hour.default=5"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["fits"] and data["problems"] == []
    assert [s["stage"] for s in data["stages"]] == \
        ["synthesize", "self_align", "engrave", "verbose_clone"]
    assert data["model"]["name"] == "llama-65b"
    assert data["cost"] == pytest.approx(5 * data["gpu_hours"], rel=1e-3)
    phase = data["stages"][1]["phases"][0]
    assert phase["gpu"] == "A100-80GB" and phase["nodes"] == 8
    assert phase["memory_gib"]["weights"] == pytest.approx(65_285_660_672 * 2 / 4 / GIB, abs=1e-3)
    assert math.isclose(sum(phase["memory_gib"].values()), phase["need_gib"], abs_tol=1e-2)


def test_65b_full_fine_tune_on_one_l4_fails_naming_the_stage(capsys):
    rc = main(["plan", str(CONFIGS / "dromedary-65b.yaml"), "--gpu", "L4",
               "engrave.train.method=full", "engrave.train.num_workers=1"])
    err = capsys.readouterr().err
    assert rc == 1
    line = next(x for x in err.splitlines() if "stage engrave (train)" in x)
    # 16 B x 65.3e9 parameters on one GPU alone is 973 GiB; an L4 offers 20 GiB of 22.5.
    assert "full, 1 worker" in line and "L4 gives 20.2" in line and "short by" in line
    short = float(line.rsplit("short by ", 1)[1].split()[0].replace(",", ""))
    assert short > 16 * 65_285_660_672 / GIB - 22.49
