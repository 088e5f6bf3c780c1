"""The PPO trainer group for models too large for one process (`ppo.trainer: deepspeed`).

`ppo.trainer_workers` rank actors (`PPORank`) form one torch.distributed group (gloo on CPU,
nccl on GPU); each holds DeepSpeed ZeRO-3 engines for the policy and the critic (full weights or
peft LoRA adapters, built by `train_common.load_model`) and, for full weights, a frozen ZeRO-3
reference; with LoRA the reference is the policy's base with its adapter switched off. The
driver talks to one `PPOTrainerGroup` actor with `trainer.PPOTrainer`'s surface, which fans each
call out to the ranks, so the loop only chooses the class.

Why plain actors and not Ray Train: the driver calls the trainer several times a step (old
log-probs, reference, values, update, weight sync) with a rollout table in between. Ray Train
runs one function per worker to completion and talks back only through `report`; every call
would need a side channel (a queue actor), and the loop would read differently per trainer.

Work split: every rank gets the whole rollout table (one object-store copy, small next to the
models) and works on its share of rows only. An update walks the same seeded minibatches as the
one-process trainer; a rank takes an equal slice of each minibatch, in micro-batches of
`ppo.micro_batch_size`, and back-propagates its slice's token-mean loss scaled by its share of
the minibatch's tokens times the world size: DeepSpeed averages gradients over ranks, so the
update is the full minibatch's token mean, as on one process (tests/test_ppo_deepspeed.py).
That walk, and the forward passes, are `core.TrainerCore`'s, shared with the one-process
trainer; this class adds the DeepSpeed engines, the process group and ZeRO checkpoints.
After each update rank 0 writes the consolidated policy (or the adapter) once for the engines.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pyarrow as pa

from dromedary_ray.config import EngineConfig, PPOConfig, TrainConfig
from dromedary_ray.errors import DromedaryError
from dromedary_ray.runtime.ppo.core import TrainerCore
from dromedary_ray.runtime.ppo.forward import (
    ADAMW_WEIGHT_DECAY,
    TokenValues,
    drop_older_versions,
    write_weights_folder,
)
from dromedary_ray.runtime.ppo.rollout import WeightsUpdate

RNG_FILE = "rng-rank{rank}.pt"


class PPOTrainerGroup:
    """The driver's trainer handle (a Ray actor needing no resources of its own): starts the
    ranks, joins them into one process group and forwards each call to all of them."""

    def __init__(self, policy_path: str, cfg: PPOConfig, value_init_path: str | None = None, *,
                 engine: EngineConfig, sync_dir: str | None = None):
        import ray

        from dromedary_ray.runtime.train_common import passed_env

        train = cfg.train_config(engine)
        rank_actor = ray.remote(PPORank).options(
            num_cpus=train.cpus_per_worker, num_gpus=1 if train.use_gpu else 0,
            runtime_env={"env_vars": passed_env()})
        self.ranks = [rank_actor.remote(r, train.num_workers, policy_path, cfg, train,
                                        value_init_path, sync_dir)
                      for r in range(train.num_workers)]
        address = ray.get(self.ranks[0].endpoint.remote())
        ray.get([r.join.remote(address) for r in self.ranks])  # init_process_group is collective

    def _all(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every rank; each rank's result, in rank order. A rank that dies
        fails the call: on gloo the others' next collective fails as soon as the dead peer's
        connection drops, not at the process group's timeout (measured: a rank killed in step
        1 ends the run within seconds; tests/faults/test_fault_ppo.py)."""
        import ray

        refs = [ray.put(a) if isinstance(a, pa.Table) else a for a in args]  # one copy for all
        return ray.get([getattr(r, method).remote(*refs) for r in self.ranks])

    def policy_logprobs(self, rollouts: pa.Table) -> list[list[float]]:
        return [row for part in self._all("policy_logprobs", rollouts) for row in part]

    def ref_logprobs(self, rollouts: pa.Table) -> list[list[float]]:
        return [row for part in self._all("ref_logprobs", rollouts) for row in part]

    def values(self, rollouts: pa.Table) -> list[list[float]]:
        return [row for part in self._all("values", rollouts) for row in part]

    def update(self, rollouts: pa.Table, step: int) -> dict[str, float]:
        return self._all("update", rollouts, step)[0]  # global numbers, the same on every rank

    def weights_for_sync(self, version: int) -> WeightsUpdate:
        return self._all("weights_for_sync", version)[0]  # rank 0 wrote the folder

    def save(self, folder: str) -> None:
        self._all("save", folder)

    def load(self, folder: str) -> None:
        self._all("load", folder)

    def save_pretrained(self, out_dir: str) -> str:
        self._all("save_pretrained", out_dir)
        return out_dir

    def health(self) -> dict[str, Any]:
        ranks = self._all("health")
        return {"ranks": ranks, "critic": ranks[0]["critic"], "pid": os.getpid()}


class PPORank(TrainerCore):
    """One rank: DeepSpeed ZeRO-3 engines for the policy, the critic and the reference."""

    def __init__(self, rank: int, world: int, policy_path: str, cfg: PPOConfig,
                 train: TrainConfig, value_init_path: str | None, sync_dir: str | None):
        import torch

        self.rank, self.world, self.cfg, self.train = rank, world, cfg, train
        self.policy_path, self.value_init_path, self.sync_dir = (policy_path, value_init_path,
                                                                 sync_dir)
        if not train.use_gpu:
            torch.set_num_threads(max(1, int(train.cpus_per_worker)))  # Ray does not pin them
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.temperature = cfg.sampling.temperature

    # --- start-up ------------------------------------------------------------------------------

    def endpoint(self) -> str:
        """Rank 0's address for the process group: this node's IP and a free port."""
        import ray

        from dromedary_ray.runtime.cluster import free_port

        ip = ray.util.get_node_ip_address()
        return f"{ip}:{free_port(ip)}"

    def join(self, address: str) -> None:
        """Join the process group (all ranks at once), then build the engines in it."""
        import torch
        import torch.distributed as dist

        host, port = address.rsplit(":", 1)
        # DeepSpeed reads the group's shape from the environment; torch from the same.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          MASTER_ADDR=host, MASTER_PORT=port)
        backend = "nccl" if self.train.use_gpu else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world)
        self.device = torch.device("cuda", 0) if self.train.use_gpu else torch.device("cpu")
        self._build()

    def _build(self) -> None:
        from dromedary_ray.runtime.train_common import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(self.policy_path)
        self.pad_id = self.tokenizer.pad_token_id
        policy, _ = load_model(self.policy_path, self.train, "causal_lm")
        self.policy = self._engine(policy, self.cfg.learning_rate)
        self.ref = None
        if self.cfg.lora is None:  # LoRA: the reference is the policy with its adapter off
            reference, _ = load_model(self.policy_path, self.train, "causal_lm")
            self.ref = self._engine(reference.requires_grad_(False), None)
        self.critic = None
        if self.cfg.advantage == "gae":
            critic, _ = load_model(self.value_init_path or self.policy_path, self.train, "score")
            if self.value_init_path is None:
                zero_score_head(critic)  # start at V = 0, as the one-process trainer
            self.critic = self._engine(TokenValues(critic), self.cfg.value_learning_rate)

    def _engine(self, model: Any, learning_rate: float | None) -> Any:
        """`model` under DeepSpeed ZeRO-3: trained with constant-LR AdamW, or frozen (None)."""
        import deepspeed

        from dromedary_ray.runtime.train_common import constant_lr_config

        hidden = getattr(model, "config", None) or model.inner.config
        config = constant_lr_config(self.train, hidden.hidden_size, learning_rate=learning_rate,
                                    grad_accum=self.share // self.micro,
                                    weight_decay=ADAMW_WEIGHT_DECAY)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=trainable if learning_rate else None)
        # Eval mode keeps PPO's ratios free of dropout; gradient checkpointing only runs in
        # train mode (LLaMA has no dropout, so there it changes nothing else).
        engine.train(self.train.gradient_checkpointing)
        return engine

    # --- the hooks of TrainerCore: DeepSpeed engines ------------------------------------------

    def _peft_policy(self) -> Any:
        return self.policy.module

    def _backward(self, which: str, loss: Any, last: bool) -> None:
        engine = self.policy if which == "policy" else self.critic
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss, scale_wrt_gas=False)  # the core weighted it already

    def _optimizer_step(self, which: str) -> float:
        engine = self.policy if which == "policy" else self.critic
        engine.step()
        norm = engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def _sum_over_ranks(self, sums: Any) -> Any:
        import torch.distributed as dist

        sums = sums.to(self.device)
        dist.all_reduce(sums)  # a few scalars: the minibatch's exact token means for the log
        return sums.cpu()

    # --- weights out, checkpoints -------------------------------------------------------------

    def weights_for_sync(self, version: int) -> WeightsUpdate | None:
        """Gather the policy (a collective) and, on rank 0, write it once for the engines:
        the consolidated weights as safetensors, or with LoRA only the adapter."""
        if self.sync_dir is None:
            raise DromedaryError("the DeepSpeed trainer group needs a sync_dir for the engines")
        if self.cfg.lora is not None:
            return self._adapter_for_sync(version)
        state = self.policy._zero3_consolidated_16bit_state_dict()  # every rank takes part
        if self.rank != 0:
            return None
        folder = write_weights_folder(state, os.path.join(self.sync_dir,
                                                          f"policy-{version:06d}"))
        drop_older_versions(self.sync_dir, "policy-", folder)
        return WeightsUpdate(version, folder=folder)

    def _adapter_for_sync(self, version: int) -> WeightsUpdate | None:
        """Only the adapter's (small) tensors are gathered, not the frozen base."""
        import deepspeed

        from dromedary_ray.runtime.ppo.trainer import save_adapter

        trainable = [p for p in self.policy.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable):
            folder = (save_adapter(self.policy.module, self.sync_dir, version)
                      if self.rank == 0 else None)
        return WeightsUpdate(version, adapter=folder) if folder else None

    def save(self, folder: str) -> None:
        """Every rank writes its ZeRO partitions (engine and optimizer) and its RNG states."""
        import torch

        lora = self.cfg.lora is not None
        self.policy.save_checkpoint(folder, tag="policy", exclude_frozen_parameters=lora)
        if self.critic is not None:
            self.critic.save_checkpoint(folder, tag="critic", exclude_frozen_parameters=lora)
        torch.save({"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                   os.path.join(folder, RNG_FILE.format(rank=self.rank)))

    def load(self, folder: str) -> None:
        import torch

        strict = self.cfg.lora is None  # a LoRA checkpoint holds the trained tensors only
        for engine, tag in ((self.policy, "policy"), (self.critic, "critic")):
            if engine is None:
                continue
            path, _ = engine.load_checkpoint(folder, tag=tag, load_module_strict=strict)
            if path is None:
                raise DromedaryError(f"{folder} holds no DeepSpeed {tag} state")
        rng = torch.load(os.path.join(folder, RNG_FILE.format(rank=self.rank)),
                         weights_only=True)  # tensors, numbers and tuples: no code on load
        torch.set_rng_state(rng["torch_rng"])
        random.setstate(rng["python_rng"])

    def save_pretrained(self, out_dir: str) -> None:
        """The final policy as a Hugging Face folder (LoRA merged), via the fine-tuning
        trainers' `save_model`: gathered by all ranks, written by rank 0."""
        from dromedary_ray.runtime.train_common import Worker, save_model

        worker = Worker(self.rank, self.world, self.train, [], self.policy, self.tokenizer, {},
                        {}, 0.0)
        save_model(worker, self.policy_path, out_dir, head="causal_lm")

    def health(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "critic": self.critic is not None,
                "device": str(self.device), "pid": os.getpid()}


def zero_score_head(model: Any) -> None:
    """Zero the one-label score head (and peft's trained copy of it) before DeepSpeed
    partitions the weights."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-2] == "score" or ".score." in name:
                param.zero_()
