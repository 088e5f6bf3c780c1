"""Typed run configuration: one frozen dataclass per concern, loaded from one YAML file.

`load_config(path, overrides)` reads the YAML, applies dotted `key=value` overrides (values parsed
as YAML, so `self_align.sampling.temperature=0.3` is a float), and builds the dataclasses. Unknown
keys and wrongly typed values raise `ConfigError` naming the dotted key. Validation lives in
`__post_init__` and raises; nothing is silently fixed (STYLE.md §7).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dromedary_ray.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# What yaml.safe_load raises besides YAMLError: its constructors for explicit tags fail with plain
# Python errors (`!!float abc`, `!!int ''`, `!!timestamp x`, `!!bool x`), and its recursive
# composer overflows on deep nesting. All mean "not valid YAML".
YAML_CONSTRUCTOR_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError,
                           RecursionError)


def _check(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {why}")


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding parameters, shared by every engine backend."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "temperature", "must be >= 0 (0 means greedy)")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.n >= 1, "n", "must be >= 1")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")


@dataclass(frozen=True)
class EngineConfig:
    """How generation engines are built and placed on the cluster."""

    backend: str = "vllm"  # vllm | transformers
    dtype: str = "float32"  # float32 on CPU (bf16 is ~3x slower on AVX2), bfloat16 on GPU
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    num_engines: int = 1
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    batch_size: int = 16  # rows per batch = one committed output shard
    # Batches each engine works on at once; their requests share the engine (engines/loop.py),
    # so one batch's tail overlaps the next ones'. batch_size x batches_in_flight rows per
    # engine: vLLM runs up to 256 sequences at once (its max_num_seqs) and queues the rest.
    # Placement only: outputs are the same.
    batches_in_flight: int = 16
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.9
    # Compiling the model costs ~60 s per engine start on CPU and gains ~25% decode speed;
    # eager wins for runs shorter than several minutes.
    enforce_eager: bool = True
    enable_prefix_caching: bool = True  # every self_align prompt shares a ~2k-token prefix
    # Run vLLM's engine core inside the worker process (tensor parallel 1 only): a killed
    # worker then leaves no orphaned engine process behind, and start-up is ~15 s shorter.
    in_process: bool = True
    # Seconds one engine call (one batch's generate) may take before the stage fails with an
    # error naming it, instead of hanging the run (engines/timeout.py). A 16-row batch of
    # 1,024-token answers takes ~1-3 minutes on a CPU engine; GPUs are far faster.
    call_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        _check(self.backend in ("vllm", "transformers"), "backend", "must be vllm or transformers")
        _check(self.call_timeout_s > 0, "call_timeout_s", "must be > 0 (seconds)")
        _check(self.dtype in ("float32", "bfloat16", "float16", "auto"), "dtype",
               "must be float32, bfloat16, float16 or auto")
        _check(self.max_model_len >= 64, "max_model_len", "must be >= 64")
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _check(self.num_engines >= 1, "num_engines", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.batches_in_flight >= 1, "batches_in_flight", "must be >= 1")
        _check(self.cpus_per_engine > 0, "cpus_per_engine", "must be > 0")
        _check(self.gpus_per_engine >= 0, "gpus_per_engine", "must be >= 0")
        _check(not (self.in_process and self.tensor_parallel_size > 1), "in_process",
               "needs tensor_parallel_size 1 (set in_process: false for tensor parallelism)")


# Resources Ray defines itself: a pool marker must be a custom resource, or it marks nothing.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local cluster on 127.0.0.1
    num_cpus: int | None = None  # logical CPUs of a local cluster (None: the machine's count)
    # The custom resource that marks the node pool each kind of work must land on (cluster/
    # aws.yaml: pool_generation, pool_training). Generation engines ask for one unit per GPU
    # they hold (one if they hold none), Ray Train workers one unit each, so the autoscaler
    # grows exactly that pool. None: no marker asked for (a local run, or one GPU pool).
    generation_pool: str | None = None
    training_pool: str | None = None

    def __post_init__(self) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1, "num_cpus", "must be >= 1")
        for key in ("generation_pool", "training_pool"):
            name = getattr(self, key)
            _check(name is None or (name != "" and name.split() == [name]), key,
                   f"must be a resource name without spaces, got {name!r}")
            _check(name not in RAY_BUILTIN_RESOURCES, key,
                   f"{name!r} is one of Ray's own resources; name the pool's custom resource "
                   "(e.g. pool_generation)")


@dataclass(frozen=True)
class SeedsConfig:
    """Where the prompts of the `seeds` stage come from (Self-Instruct JSONL)."""

    file: str = "principles/seed_tasks.jsonl"
    max_prompts: int | None = None

    def __post_init__(self) -> None:
        _check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1")


@dataclass(frozen=True)
class SelfAlignConfig:
    """Principle-driven self-alignment (Self-Align §3.2): principles + exemplars + query."""

    principles_file: str = "principles/self_align.yaml"
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.5, top_p=0.95, max_new_tokens=256)
    )
    num_exemplars: int | None = None  # None: all; fewer fit 2k-context models (LLaMA-65B)
    thoughts_lead: str = "The user"  # pre-filled start of the thoughts, as in every exemplar
    max_thought_tokens: int = 96
    min_answer_words: int = 3
    max_repeated_ngram_fraction: float = 0.5  # runaway repetition filter
    exemplar_leak_ngram: int = 12  # an answer sharing a 12-word run with an exemplar leaked it

    def __post_init__(self) -> None:
        _check(self.max_thought_tokens >= 1, "max_thought_tokens", "must be >= 1")
        _check(self.num_exemplars is None or self.num_exemplars >= 1, "num_exemplars",
               "must be >= 1")
        _check(self.min_answer_words >= 1, "min_answer_words", "must be >= 1")
        _check(0 < self.max_repeated_ngram_fraction <= 1, "max_repeated_ngram_fraction",
               "must be in (0, 1]")
        _check(self.exemplar_leak_ngram >= 4, "exemplar_leak_ngram", "must be >= 4")


@dataclass(frozen=True)
class SelfInstructConfig:
    """Self-Instruct rounds (Wang et al. 2023): few-shot prompts from seed and synthetic pools."""

    target_count: int = 64  # new instructions to keep
    num_seed_examples: int = 6  # few-shot examples drawn from the seed pool per prompt
    num_synthetic_examples: int = 2  # ... and from instructions made in earlier rounds
    requests_per_round: int = 32
    instructions_per_request: int = 8  # new list items asked for (and parsed) per request
    max_rounds: int = 20
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.98, max_new_tokens=256)
    )

    def __post_init__(self) -> None:
        _check(self.target_count >= 0, "target_count", "must be >= 0")
        _check(self.num_seed_examples >= 1, "num_seed_examples", "must be >= 1")
        _check(self.num_synthetic_examples >= 0, "num_synthetic_examples", "must be >= 0")
        _check(self.requests_per_round >= 1, "requests_per_round", "must be >= 1")
        _check(self.instructions_per_request >= 1, "instructions_per_request", "must be >= 1")
        _check(self.max_rounds >= 1, "max_rounds", "must be >= 1")


@dataclass(frozen=True)
class RedTeamConfig:
    """Topic-guided red-teaming (Self-Align §3.1): topics per question type, then questions."""

    types_file: str = "principles/red_team_types.yaml"
    topics_per_type: int = 4  # new topics kept per type (the seed topic not counted)
    topics_per_request: int = 8  # topics asked for per brainstorm request
    max_listed_topics: int = 20  # known topics shown in a brainstorm prompt (a random sample)
    max_topic_words: int = 8  # a longer "topic" is a sentence, not a topic
    require_question: bool = True  # drop red-team "questions" that do not end with "?"
    brainstorm_rounds: int = 2
    questions_per_topic: int = 1
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.98, max_new_tokens=128)
    )

    def __post_init__(self) -> None:
        _check(self.topics_per_type >= 0, "topics_per_type", "must be >= 0")
        _check(self.topics_per_request >= 1, "topics_per_request", "must be >= 1")
        _check(self.max_listed_topics >= 1, "max_listed_topics", "must be >= 1")
        _check(self.max_topic_words >= 1, "max_topic_words", "must be >= 1")
        _check(self.brainstorm_rounds >= 1, "brainstorm_rounds", "must be >= 1")
        _check(self.questions_per_topic >= 1, "questions_per_topic", "must be >= 1")


@dataclass(frozen=True)
class SynthesizeConfig:
    """The synthesize stage: self-instruct and red-teaming prompts, filtered, in one table."""

    seed_file: str = "principles/seed_tasks.jsonl"
    self_instruct: SelfInstructConfig = field(default_factory=SelfInstructConfig)
    red_team: RedTeamConfig = field(default_factory=RedTeamConfig)
    min_words: int = 3
    max_words: int = 150
    # Alpaca's filter: tasks a text-only model cannot do.
    banned_keywords: tuple[str, ...] = (
        "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
        "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
    )
    rouge_threshold: float = 0.7  # near-duplicate: ROUGE-L F strictly above this is dropped

    def __post_init__(self) -> None:
        _check(1 <= self.min_words <= self.max_words, "min_words", "must be in [1, max_words]")
        _check(0 < self.rouge_threshold <= 1, "rouge_threshold", "must be in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """Supervised fine-tuning on Ray Train with DeepSpeed ZeRO-3 (engrave, verbose clone)."""

    method: str = "full"  # full | lora
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    merge_lora: bool = True  # write merged full weights (else the adapter folder)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    epochs: int = 1
    max_steps: int | None = None  # stop early (tests, smoke runs)
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0  # gradient clipping (0 disables it)
    micro_batch_size: int = 4  # per worker
    gradient_accumulation_steps: int = 1
    max_seq_len: int = 512
    zero_stage: int = 3
    bf16: bool = False  # CPUs here lack fast bf16; set true on A100/H100
    gradient_checkpointing: bool = False
    checkpoint_every_steps: int = 50
    max_failures: int = 2  # Ray Train restarts from the last checkpoint this many times
    log_every_steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.method in ("full", "lora"), "method", "must be full or lora")
        _check(self.num_workers >= 1, "num_workers", "must be >= 1")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
               "must be >= 1")
        _check(self.max_seq_len >= 16, "max_seq_len", "must be >= 16")
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        _check(self.checkpoint_every_steps >= 1, "checkpoint_every_steps", "must be >= 1")
        _check(self.lora_rank >= 1, "lora_rank", "must be >= 1")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")


@dataclass(frozen=True)
class EngraveConfig:
    """Principle engraving (Self-Align §3.3): fine-tune on (query, answer) without principles."""

    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class VerboseCloneConfig:
    """Verbose cloning (Self-Align §3.4): the engraved model answers under a verbose system
    prompt, then a second fine-tune learns those answers without the prompt."""

    system_prompt_file: str = "principles/verbose.yaml"
    # The paper decoded at T=0.3, top-p 0.7 with tri/quad-gram frequency penalties (1.0, 2.0).
    # vLLM has token-level penalties only; a frequency penalty is the nearest we have.
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.3, top_p=0.7, max_new_tokens=512,
                                               frequency_penalty=0.3)
    )
    min_answer_words: int = 8
    max_repeated_ngram_fraction: float = 0.5
    init_from: str = "base"  # base | engraved: the model the second fine-tune starts from
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(self.init_from in ("base", "engraved"), "init_from", "must be base or engraved")
        _check(self.min_answer_words >= 1, "min_answer_words", "must be >= 1")


@dataclass(frozen=True)
class AnswerConfig:
    """I-SHEEP step (b): the model answers its own prompts as a plain chat turn."""

    system_prompt_file: str | None = None  # None: the tokenizer's default system turn
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=256)
    )
    min_answer_words: int = 3
    max_repeated_ngram_fraction: float = 0.5

    def __post_init__(self) -> None:
        _check(self.min_answer_words >= 1, "min_answer_words", "must be >= 1")
        _check(0 < self.max_repeated_ngram_fraction <= 1, "max_repeated_ngram_fraction",
               "must be in (0, 1]")


@dataclass(frozen=True)
class AssessConfig:
    """I-SHEEP step (c)-(d): the model grades its own (prompt, answer) pairs under rubrics."""

    rubrics_file: str = "principles/isheep_rubrics.yaml"
    rubrics: tuple[str, ...] = ("quality", "following")  # names in the file, all applied
    # generate: the grade is sampled as text and parsed strictly; expected: the expected score
    # over the digit tokens' probabilities, read from the next-token distribution (no sampling).
    method: str = "generate"
    threshold: float = 8.0  # I-SHEEP keeps a pair only where every score exceeds 8
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=8, stop=("\n",))
    )

    def __post_init__(self) -> None:
        _check(self.method in ("generate", "expected"), "method", "must be generate or expected")
        _check(len(self.rubrics) >= 1, "rubrics", "name at least one rubric")
        _check(len(set(self.rubrics)) == len(self.rubrics), "rubrics", "names repeat")


@dataclass(frozen=True)
class IsheepConfig:
    """I-SHEEP (Liang et al. 2024): iterations of self-made prompts, answers, self-assessment,
    filtering and fine-tuning. Iteration k runs under `<run>/isheep/iter_<k>/`."""

    iterations: int = 3
    # base: each iteration fine-tunes the base model on its own data (the paper's default);
    # previous: it continues from the model the last iteration made.
    init_from: str = "base"
    reseed: bool = True  # iteration k samples with seeds offset by k, so prompts differ
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    assess: AssessConfig = field(default_factory=AssessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Set by the iteration loop, not by users: the model `init_from: base` trains from.
    base_model: str | None = None

    def __post_init__(self) -> None:
        _check(self.iterations >= 1, "iterations", "must be >= 1")
        _check(self.init_from in ("base", "previous"), "init_from", "must be base or previous")


@dataclass(frozen=True)
class PreferencesConfig:
    """SALMON's synthetic preferences (§3.1): two responses per prompt from the SFT model, each
    pair judged under single principles, in both orders, by next-token choice log-probs."""

    principles_file: str = "principles/salmon.yaml"
    principles_per_pair: int = 4  # principles drawn (by prompt-type weight) to judge each pair
    judge: str = "policy"  # policy (the SFT model) | base (config.model) | any model spec
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=256)
    )
    min_answer_words: int = 3
    max_repeated_ngram_fraction: float = 0.5
    seed: int = 0  # principle draws

    def __post_init__(self) -> None:
        _check(self.principles_per_pair >= 1, "principles_per_pair", "must be >= 1")
        _check(self.min_answer_words >= 1, "min_answer_words", "must be >= 1")


@dataclass(frozen=True)
class RewardModelConfig:
    """SALMON's principle-following reward model (§3.2): the preferences stage's judgements
    aggregated into principle-conditioned pairs (some principles negated), then a scalar-head
    model trained on them with the pairwise Bradley-Terry loss (runtime/train_rm.py)."""

    principles_file: str = "principles/salmon.yaml"
    # base (config.model, as SALMON initialises its RM) | policy (the SFT stage's model) | a spec
    init_from: str = "base"
    # Aggregation (algos/salmon_prefs.py::aggregate_rm_examples; defaults are SALMON's):
    # principles per example ~ Geometric(geometric_p) in [min, max], each negated with
    # negate_prob, labels flipped with flip_prob, draws_per_pair examples per judged pair.
    min_principles: int = 1
    max_principles: int = 8
    geometric_p: float = 0.2
    negate_prob: float = 0.5
    flip_prob: float = 0.1
    draws_per_pair: int = 4
    normalize_scores: bool = True  # divide each principle's judge scores by their RMS first
    seed: int = 0  # aggregation draws and the held-out split
    heldout_fraction: float = 0.1  # of response pairs (by a hash of the pair id), not examples
    train_eval_examples: int | None = 512  # re-scored after training for train_accuracy (None: all)
    eval_batch_size: int = 8
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(bool(self.init_from.strip()), "init_from", "must be base, policy or a model spec")
        _check(1 <= self.min_principles <= self.max_principles, "min_principles",
               "must be in [1, max_principles]")
        for name in ("geometric_p", "negate_prob", "flip_prob"):
            _check(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        _check(self.draws_per_pair >= 1, "draws_per_pair", "must be >= 1")
        _check(0 <= self.heldout_fraction < 1, "heldout_fraction", "must be in [0, 1)")
        _check(self.train_eval_examples is None or self.train_eval_examples >= 1,
               "train_eval_examples", "must be >= 1 (or null for all)")
        _check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _check(self.train.method == "full" or self.train.merge_lora, "train.merge_lora",
               "must be true for the reward model: transformers and vLLM's reward runner load "
               "plain weights, and the LoRA retrains the score head")


@dataclass(frozen=True)
class PPOLoRAConfig:
    """A LoRA adapter for PPO (`ppo.lora`): the fields mean what TrainConfig's `lora_*` fields
    mean for fine-tuning, and the trainer builds its peft config through the same helper."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0  # PPO's ratios want the same network at rollout and update
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        _check(1 <= self.rank <= 512, "rank", "must be in [1, 512] (vLLM's largest adapter)")
        _check(self.alpha >= 1, "alpha", "must be >= 1")
        _check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _check(len(self.target_modules) >= 1, "target_modules", "name at least one module")


# PPOConfig's deadlines: they bound how long the loop waits, not what it computes, so neither
# the stage's fingerprint nor a checkpoint's covers them (raising one keeps the checkpoints).
PPO_DEADLINES = ("call_timeout_s", "update_timeout_s", "start_timeout_s")
# Every PPOConfig field that changes when or how long, not what, the loop computes: left out of
# the stage's fingerprint (stages/ppo.py) and a checkpoint's (runtime/ppo/loop.py).
PPO_NOT_FINGERPRINTED = ("checkpoint_every_steps", *PPO_DEADLINES)


@dataclass(frozen=True)
class PPOConfig:
    """SALMON's RL stage (§3.3): PPO on the SFT policy against the principle-following reward
    model. Each prompt is scored under principles drawn by its prompt type plus (by default)
    every intervention principle. See dromedary_ray/runtime/ppo/loop.py."""

    principles_file: str = "principles/salmon.yaml"
    principles_per_prompt: int = 3  # SALMON draws 3 principles per prompt at RL time
    use_interventions: bool = True  # append every intervention principle to each prompt's list
    steps: int = 100
    prompts_per_step: int = 16
    samples_per_prompt: int = 1  # >= 2 for the rloo and group advantages
    ppo_epochs: int = 2  # passes over each step's rollouts (SALMON's script: 2)
    mini_batch_size: int = 8  # sequences per optimizer step; divides the step's rollouts
    learning_rate: float = 1e-6
    value_learning_rate: float = 5e-6
    max_grad_norm: float = 1.0  # 0 disables clipping
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    kl_coef: float = 0.01  # SALMON's KL_COEF: per-token KL penalty in the reward
    kl_estimator: str = "k1"  # k1 | k2 | k3 (algos/rl.py::kl_estimators)
    gamma: float = 1.0
    lam: float = 0.95
    advantage: str = "gae"  # gae (with the value model) | rloo | group (critic-free)
    whiten_advantages: bool = True  # gae only: normalise over the step's response tokens
    value_init: str = "reward_model"  # reward_model | policy: where the critic's weights start
    # SALMON: a bonus of 5.0 per max response length (5.0/512 per token here), capped at 0.8 of
    # 5.0, and 6.0 off a response cut at the length limit (algos/rl.py::
    # length_bonus_and_unfinished_penalty). 0 turns each off.
    length_bonus_per_token: float = 5.0 / 512
    max_bonus: float | None = 4.0
    unfinished_penalty: float = 6.0
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=512)
    )
    checkpoint_every_steps: int = 10
    reward_backend: str = "vllm"  # vllm (pooling runner) | transformers
    seed: int = 0  # prompt order, principle draws, sampling seeds, minibatch order
    # torch: policy, critic and reference in one process (runtime/ppo/trainer.py);
    # deepspeed: `trainer_workers` ranks under DeepSpeed ZeRO-3 (runtime/ppo/ds_trainer.py),
    # each training on its share of every minibatch.
    trainer: str = "torch"
    trainer_workers: int = 1  # deepspeed only; divides mini_batch_size
    # Rows per forward/backward (on each rank); a rank's share of a minibatch
    # (mini_batch_size / trainer_workers) is accumulated over these, so the update is the same
    # and memory falls with it. None: the whole share at once.
    micro_batch_size: int | None = None
    bf16: bool = False  # deepspeed only: bf16 weights with fp32 master copies (GPUs)
    gradient_checkpointing: bool = False  # deepspeed only
    lora: PPOLoRAConfig | None = None  # None: full weights; else policy and critic adapters
    rollout_engines: int | None = None  # None: engine.num_engines (the generation stages')
    # Deadlines on the loop's calls to its actors (runtime/ppo/loop.py): a hung engine or
    # trainer fails the stage with an error naming it instead of hanging the run. call: a
    # step's generate, score, log-prob and value passes, weight sync; update: the trainer's
    # update and the calls that move all its state (checkpoint save and load, the final model;
    # an update on SmolLM2 takes ~80 s on this CPU); start: starting the actors (model loads,
    # engine start-up, DeepSpeed's compiled ops on first use).
    call_timeout_s: float = 900.0
    update_timeout_s: float = 3600.0
    start_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in PPO_DEADLINES:  # finite: Ray takes a deadline as whole milliseconds
            _check(0 < getattr(self, name) < math.inf, name, "must be > 0 and finite (seconds)")
        _check(self.principles_per_prompt >= 1, "principles_per_prompt", "must be >= 1")
        _check(self.steps >= 1, "steps", "must be >= 1")
        _check(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        _check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        _check(self.advantage in ("gae", "rloo", "group"), "advantage",
               "must be gae, rloo or group")
        _check(self.advantage == "gae" or self.samples_per_prompt >= 2, "samples_per_prompt",
               f"advantage {self.advantage} compares samples of a prompt: needs >= 2")
        _check(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        rollouts = self.prompts_per_step * self.samples_per_prompt
        _check(self.mini_batch_size >= 1 and rollouts % self.mini_batch_size == 0,
               "mini_batch_size", f"must divide the {rollouts} rollouts of a step "
               "(prompts_per_step x samples_per_prompt)")
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.value_learning_rate > 0, "value_learning_rate", "must be > 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check(self.clip_eps > 0, "clip_eps", "must be > 0")
        _check(self.value_clip_eps > 0, "value_clip_eps", "must be > 0")
        _check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        _check(self.kl_estimator in ("k1", "k2", "k3"), "kl_estimator", "must be k1, k2 or k3")
        _check(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        _check(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        _check(self.value_init in ("reward_model", "policy"), "value_init",
               "must be reward_model or policy")
        _check(self.length_bonus_per_token >= 0, "length_bonus_per_token", "must be >= 0")
        _check(self.max_bonus is None or self.max_bonus >= 0, "max_bonus", "must be >= 0")
        _check(self.unfinished_penalty >= 0, "unfinished_penalty",
               "is an amount subtracted: must be >= 0")
        _check(self.sampling.n == 1, "sampling.n",
               "must be 1; set samples_per_prompt for several samples per prompt")
        _check(self.sampling.temperature > 0, "sampling.temperature",
               "must be > 0: PPO needs samples from the policy, not greedy decoding")
        _check(self.checkpoint_every_steps >= 1, "checkpoint_every_steps", "must be >= 1")
        _check(self.reward_backend in ("vllm", "transformers"), "reward_backend",
               "must be vllm or transformers")
        _check(self.trainer in ("torch", "deepspeed"), "trainer", "must be torch or deepspeed")
        _check(self.trainer_workers >= 1, "trainer_workers", "must be >= 1")
        _check(self.trainer == "deepspeed" or self.trainer_workers == 1, "trainer_workers",
               "must be 1 for trainer torch (one process); set trainer: deepspeed")
        _check(self.trainer == "deepspeed" or not (self.bf16 or self.gradient_checkpointing),
               "bf16", "bf16 and gradient_checkpointing are deepspeed trainer settings")
        _check(self.mini_batch_size % self.trainer_workers == 0, "trainer_workers",
               f"must divide mini_batch_size {self.mini_batch_size}: every rank takes an "
               "equal share of each minibatch (ZeRO-3 forwards are collective)")
        share = self.mini_batch_size // self.trainer_workers
        _check(self.micro_batch_size is None or (self.micro_batch_size >= 1
                                                 and share % self.micro_batch_size == 0),
               "micro_batch_size", f"must divide a rank's {share} rows per minibatch "
               "(mini_batch_size / trainer_workers)")
        _check(self.rollout_engines is None or self.rollout_engines >= 1, "rollout_engines",
               "must be >= 1 (or null for engine.num_engines)")

    @property
    def rows_per_forward(self) -> int:
        """Rows in each forward/backward of either trainer: `micro_batch_size`, else a rank's
        whole share of a minibatch."""
        return self.micro_batch_size or self.mini_batch_size // self.trainer_workers

    def train_config(self, engine: EngineConfig) -> TrainConfig:
        """The TrainConfig the DeepSpeed trainer group runs with, derived from these fields.

        One source for the runtime (`train_common` helpers build the DeepSpeed and peft
        configs from it) and the planner (memory and time); not a user-facing section.
        Workers sit on GPUs when the rollout engines do, with an engine's share of CPUs.
        """
        lora = self.lora or PPOLoRAConfig()
        return TrainConfig(
            method="lora" if self.lora else "full", lora_rank=lora.rank, lora_alpha=lora.alpha,
            lora_dropout=lora.dropout, lora_target_modules=lora.target_modules,
            num_workers=self.trainer_workers, use_gpu=engine.gpus_per_engine > 0,
            cpus_per_worker=engine.cpus_per_engine, epochs=self.ppo_epochs,
            learning_rate=self.learning_rate, max_grad_norm=self.max_grad_norm,
            micro_batch_size=self.rows_per_forward, max_seq_len=engine.max_model_len, zero_stage=3,
            bf16=self.bf16, gradient_checkpointing=self.gradient_checkpointing, seed=self.seed,
            warmup_ratio=0.0)


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate every model the run makes, right after the stage that made it (and the base
    model first), with `dromedary eval` suites; results go to <run>/eval/<stage>/<suite>.json."""

    suites: tuple[str, ...] = ()  # e.g. [ifeval]; empty: no automatic evaluation
    include_base: bool = True  # also the starting model, labelled "base"
    hhh_data: str | None = None  # the suites whose data is not shipped need a path
    truthfulqa_data: str | None = None
    backend: str = "vllm"
    max_new_tokens: int = 256
    max_model_len: int = 2048
    limit: int | None = None  # first N items per suite (quick looks)
    # Seconds one model's run of one suite may take (pipeline/evaluate.py); past it the task
    # is cancelled and the run fails naming the model and suite, instead of a hung engine
    # stalling the run between stages for ever. Generous: whole suites on a CPU engine.
    timeout_s: float = 7200.0

    def __post_init__(self) -> None:
        _check(0 < self.timeout_s < math.inf, "timeout_s", "must be > 0 and finite (seconds)")
        known = ("hhh", "truthfulqa", "ifeval")  # pairwise needs a second model and a judge
        for suite in self.suites:
            _check(suite in known, "suites", f"{suite!r} is not one of {', '.join(known)}")
        _check("hhh" not in self.suites or self.hhh_data is not None, "hhh_data",
               "the hhh suite needs its data path")
        _check("truthfulqa" not in self.suites or self.truthfulqa_data is not None,
               "truthfulqa_data", "the truthfulqa suite needs its data path")
        _check(self.backend in ("vllm", "transformers"), "backend", "must be vllm or transformers")
        _check(self.limit is None or self.limit >= 1, "limit", "must be >= 1")

    def data(self, suite: str) -> str | None:
        return {"hhh": self.hhh_data, "truthfulqa": self.truthfulqa_data}.get(suite)


RECIPES: dict[str, tuple[str, ...]] = {
    "seeds_only": ("seeds",),
    "self_align": ("seeds", "self_align"),
    "dromedary": ("synthesize", "self_align", "engrave", "verbose_clone"),
    "synthesize_only": ("synthesize",),
    "synthesize_align": ("synthesize", "self_align"),
    # I-SHEEP: `isheep` runs `isheep.iterations` iterations, each one `isheep_iteration`.
    "isheep": ("synthesize", "answer", "assess", "sft"),
    "isheep_iteration": ("synthesize", "answer", "assess", "sft"),
    # SALMON on top of Self-Align: the SFT model's own pairs, a principle-following RM, PPO.
    "salmon": ("synthesize", "self_align", "engrave", "verbose_clone", "preferences",
               "reward_model", "ppo"),
}
ITERATED_RECIPES = ("isheep",)  # recipes the driver runs as iterations of their stages


@dataclass(frozen=True)
class PlanConfig:
    """Assumptions of `dromedary plan` (memory, nodes, hours and cost on paper); no stage reads
    them, so they change no fingerprint. The planner states each one in its output."""

    gpu: str = "A100-80GB"  # GPU type when no cluster file is given (dromedary_ray/plan/gpus.yaml)
    # USD per GPU-hour by GPU type; the key "default" prices any type not listed. Empty: no cost.
    price_per_gpu_hour: dict[str, float] = field(default_factory=dict)
    mfu: float = 0.4  # model FLOPs utilisation of prefill and training (of dense bf16 peak)
    decode_efficiency: float = 0.6  # fraction of peak memory bandwidth a decode step reaches
    train_headroom: float = 0.1  # fraction of each GPU training leaves free (context, NCCL)
    keep_fraction: float = 0.5  # rows a generation stage keeps after its filters
    prompts: int | None = None  # prompts entering the recipe; None: from seeds/synthesize
    query_tokens: int = 48  # mean tokens of one instruction or question
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # stage -> mean prompt tokens
    model_shape: str | None = None  # a name in plan/models.yaml or a HF folder; None: `model`

    def __post_init__(self) -> None:
        _check(0 < self.mfu <= 1, "mfu", "must be in (0, 1]")
        _check(0 < self.decode_efficiency <= 1, "decode_efficiency", "must be in (0, 1]")
        _check(0 <= self.train_headroom < 1, "train_headroom", "must be in [0, 1)")
        _check(0 < self.keep_fraction <= 1, "keep_fraction", "must be in (0, 1]")
        _check(self.prompts is None or self.prompts >= 1, "prompts", "must be >= 1")
        _check(self.query_tokens >= 1, "query_tokens", "must be >= 1")
        _check_mapping(self.price_per_gpu_hour, "price_per_gpu_hour", float, "a price >= 0",
                       lambda v: v >= 0)
        _check_mapping(self.prompt_tokens, "prompt_tokens", int, "a token count >= 1",
                       lambda v: v >= 1)


def _check_mapping(value: Any, key: str, kind: type, what: str, ok: Any) -> None:
    _check(isinstance(value, dict), key, "must be a mapping")
    for name, v in value.items():
        number = isinstance(v, int | float) and not isinstance(v, bool)
        _check(number and (kind is float or isinstance(v, int)) and ok(v), f"{key}.{name}",
               f"must be {what}, got {v!r}")


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/local"
    recipe: str = "self_align"
    # Stop after this stage of the recipe (`dromedary run --until STAGE`); a later run without
    # it skips what is done and goes on. None: the whole recipe.
    until: str | None = None
    model: str = "builtin:smollm2-135m"
    ray: RayConfig = field(default_factory=RayConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    self_align: SelfAlignConfig = field(default_factory=SelfAlignConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    engrave: EngraveConfig = field(default_factory=EngraveConfig)
    verbose_clone: VerboseCloneConfig = field(default_factory=VerboseCloneConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    isheep: IsheepConfig = field(default_factory=IsheepConfig)
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        _check(self.recipe in RECIPES, "recipe", f"unknown recipe; known: {', '.join(RECIPES)}")
        _check(self.until is None or self.recipe not in ITERATED_RECIPES, "until",
               f"recipe {self.recipe} runs in iterations; set {self.recipe}.iterations instead")
        _check(self.until is None or self.until in RECIPES[self.recipe], "until",
               f"{self.until!r} is not a stage of recipe {self.recipe} "
               f"({', '.join(RECIPES[self.recipe])})")

    @property
    def stages(self) -> tuple[str, ...]:
        """The recipe's stages, up to `until` when set."""
        stages = RECIPES[self.recipe]
        return stages if self.until is None else stages[:stages.index(self.until) + 1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        """One stage's config as a plain dict, for fingerprints."""
        return dataclasses.asdict(getattr(self, name))


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the working directory, then in the project root.

    So `principles/self_align.yaml` works from a checkout, from `ray job submit --working-dir`,
    and from anywhere else for an editable install.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p if (PROJECT_ROOT / p).exists() else p


# --- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except YAML_CONSTRUCTOR_ERRORS as err:
            raise ConfigError(f"{path}: not valid YAML: a bad !!tag value or nesting too deep "
                              f"({type(err).__name__}: {err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
    for item in overrides:
        _apply_override(data, item)
    return build(RunConfig, data, prefix="")


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except (yaml.YAMLError, *YAML_CONSTRUCTOR_ERRORS):
        value = raw  # not YAML: the string as written (`!!int abc` included)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
    node[parts[-1]] = value


def build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, naming the dotted key of any error."""
    if isinstance(data, cls):
        return data
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be ints, bools, null
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, f"{key}.")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(typing.get_args(tp)[0], v, key) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; it means a number
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and
                                               not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)
