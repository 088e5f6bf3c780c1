from pathlib import Path

import pytest

from dromedary_ray.config import (
    PROJECT_ROOT,
    RunConfig,
    SamplingConfig,
    dump_config,
    load_config,
)
from dromedary_ray.errors import ConfigError

CONFIGS = PROJECT_ROOT / "configs"


@pytest.mark.parametrize(
    "name, stages",
    [("local.yaml", ("seeds", "self_align")),
     ("dromedary-65b.yaml", ("synthesize", "self_align", "engrave", "verbose_clone"))],
)
def test_shipped_configs_load(name, stages):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)
    assert cfg.stages == stages


def test_paper_scale_config_has_paper_decoding():
    cfg = load_config(CONFIGS / "dromedary-65b.yaml")
    assert cfg.engine.tensor_parallel_size == 4 and cfg.engine.gpus_per_engine == 4
    assert (cfg.self_align.sampling.temperature, cfg.self_align.sampling.top_p) == (0.5, 0.95)
    assert cfg.engine.max_model_len == 2048 and cfg.self_align.num_exemplars == 2
    for train in (cfg.engrave.train, cfg.verbose_clone.train):  # the released scripts' LoRA
        assert (train.method, train.lora_rank, train.learning_rate) == ("lora", 16, 4e-4)
        assert train.num_workers * train.micro_batch_size * train.gradient_accumulation_steps \
            == 768


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "local.yaml", ["self_align.sampling.temperature=0",
                                               "engine.num_engines=2", "seeds.max_prompts=7",
                                               "self_align.sampling.stop=[a, b]"])
    assert cfg.self_align.sampling.temperature == 0.0
    assert isinstance(cfg.self_align.sampling.temperature, float)
    assert cfg.engine.num_engines == 2 and cfg.seeds.max_prompts == 7
    assert cfg.self_align.sampling.stop == ("a", "b")


@pytest.mark.parametrize(
    "override, key",
    [
        ("engine.num_engine=2", "engine.num_engine"),
        ("self_align.sampling.temprature=1", "self_align.sampling.temprature"),
        ("bogus=1", "bogus"),
    ],
)
def test_unknown_keys_name_the_dotted_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: unknown key"):
        load_config(CONFIGS / "local.yaml", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("engine.num_engines=two", r"engine\.num_engines: expected int"),
        ("engine.num_engines=0", r"engine\.num_engines: must be >= 1"),
        ("self_align.sampling.top_p=1.5", r"self_align\.sampling\.top_p: must be in"),
        ("engine.backend=onnx", r"engine\.backend: must be vllm or transformers"),
        ("recipe=nope", r"recipe: unknown recipe"),
        ("engine.enforce_eager=1", r"engine\.enforce_eager: expected bool"),
        ("engine=3", r"engine: expected a mapping"),
        ("novalue", r"must look like key=value"),
    ],
)
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "local.yaml", [override])


def test_exponent_floats_without_a_dot_are_numbers():
    cfg = load_config(CONFIGS / "local.yaml", ["engrave.train.learning_rate=1e-3"])
    assert cfg.engrave.train.learning_rate == 0.001
    with pytest.raises(ConfigError, match="engrave.train.learning_rate: expected float"):
        load_config(CONFIGS / "local.yaml", ["engrave.train.learning_rate=fast"])


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config(CONFIGS / "local.yaml", ["self_align.sampling.stop=[x]"])
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(cfg))
    assert load_config(out) == cfg


def test_sampling_validation_raises_instead_of_fixing():
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_pool_markers_default_to_none_and_reach_the_resource_requests():
    from dromedary_ray.runtime.cluster import pool_resources, use_pools

    plain = load_config(CONFIGS / "local.yaml")
    assert (plain.ray.generation_pool, plain.ray.training_pool) == (None, None)
    use_pools(plain.ray)
    assert pool_resources("generation", 1) == {} and pool_resources("training", 1) == {}
    cfg = load_config(CONFIGS / "local.yaml", ["ray.generation_pool=pool_generation",
                                               "ray.training_pool=pool_training"])
    try:
        use_pools(cfg.ray)
        assert pool_resources("generation", 4) == {"pool_generation": 4}  # one unit per GPU
        assert pool_resources("training", 1) == {"pool_training": 1}
        with pytest.raises(ValueError, match="pool kind"):
            pool_resources("serving", 1)
    finally:
        use_pools(plain.ray)


@pytest.mark.parametrize(
    "override, message",
    [
        ("ray.generation_pool=GPU", r"ray\.generation_pool: 'GPU' is one of Ray's own"),
        ("ray.training_pool=CPU", r"ray\.training_pool: 'CPU' is one of Ray's own"),
        ("ray.training_pool=''", r"ray\.training_pool: must be a resource name"),
        ("ray.generation_pool='pool generation'", r"ray\.generation_pool: must be a resource"),
        ("ray.generation_pool=3", r"ray\.generation_pool: expected str"),
    ],
)
def test_pool_markers_are_validated_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "local.yaml", [override])


def test_until_stops_the_recipe_after_a_stage_and_keeps_fingerprints():
    from dromedary_ray.pipeline.driver import stage_fingerprints

    whole = load_config(CONFIGS / "local.yaml", ["recipe=salmon"])
    part = load_config(CONFIGS / "local.yaml", ["recipe=salmon", "until=engrave"])
    assert part.stages == ("synthesize", "self_align", "engrave")
    assert whole.stages[:3] == part.stages and len(whole.stages) == 7
    # A later run without `until` finds these stages done: the same fingerprints.
    full, cut = stage_fingerprints(whole), stage_fingerprints(part)
    assert {k: full[k] for k in cut} == cut


@pytest.mark.parametrize("overrides,message", [
    (["until=ppo"], r"^until: 'ppo' is not a stage of recipe self_align \(seeds, self_align\)"),
    (["recipe=isheep", "until=sft"], r"^until: recipe isheep runs in iterations"),
])
def test_until_names_what_is_wrong(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "local.yaml", overrides)
