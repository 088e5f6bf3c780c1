"""What both PPO trainers (`trainer.py`, one process; `ds_trainer.py`, DeepSpeed ranks) do with
a model and a rollout table: build the padded batch, read response-token log-probs and values,
compute the policy and value losses of a set of rows, and write the policy for the engines.

Sequences are prompt + response, right-padded; the logits at position len(prompt) - 1 + t score
response token t, and the critic's hidden state there is the state before token t. Losses come
from `algos.rl`. Keeping this in one place is what makes the two trainers comparable token for
token (tests/test_ppo_deepspeed.py checks they are).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from dromedary_ray.algos.ppo import length_mask, pad_right
from dromedary_ray.errors import DromedaryError

# torch.optim.AdamW's default, written out so that both trainers use the same optimizer.
ADAMW_WEIGHT_DECAY = 0.01
LOSS_STATS = ("loss", "clip_fraction", "approx_kl", "entropy")  # policy terms, token-weighted


@dataclass
class Batch:
    input_ids: Any  # [B, L] prompt + response, right-padded
    attention: Any  # [B, L]
    positions: Any  # [B, T] index of the logit that scores response token t
    response_ids: Any  # [B, T]
    mask: Any  # [B, T] 1.0 on response tokens
    lengths: list[int]  # response lengths


def build_batch(rollouts: pa.Table, pad_id: int) -> Batch:
    prompts = rollouts["prompt_token_ids"].to_pylist()
    responses = rollouts["response_token_ids"].to_pylist()
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    lengths = [len(r) for r in responses]
    if min(lengths, default=1) < 1:
        raise DromedaryError("a rollout has an empty response; nothing to train on")
    width, steps = max(len(s) for s in seqs), max(lengths)
    ids = pad_right(seqs, width, torch.long, pad_id)
    attention = length_mask([len(s) for s in seqs], width).long()
    starts = torch.tensor([len(p) for p in prompts])
    positions = (starts[:, None] - 1 + torch.arange(steps)[None, :]).clamp(max=width - 1)
    return Batch(ids, attention, positions, pad_right(responses, steps, torch.long),
                 length_mask(lengths, steps), lengths)


def row_columns(rollouts: pa.Table, b: Batch, with_critic: bool) -> dict[str, Any]:
    """The per-token columns an update reads, padded like `b`: old log-probs, advantages, and
    for the critic old values and returns."""
    keys = ("policy_logprobs", "advantages") + (("values", "returns") if with_critic else ())
    return {k: pad_right(rollouts[k].to_pylist(), b.mask.shape[1]) for k in keys}


def row_inputs(b: Batch, idx: list[int], device: Any) -> tuple[Any, Any, Any]:
    """(input ids, attention mask, positions) of rows `idx`, cut to the longest of those rows:
    the batch is padded to the step's longest sequence, and a forward over a micro-batch of
    short rows need not pay for it. Sequences are right-padded, so the cut columns are padding
    that no kept position attends to; positions past a row's end are masked out anyway."""
    width = int(b.attention[idx].sum(1).max())
    return (b.input_ids[idx, :width].to(device), b.attention[idx, :width].to(device),
            b.positions[idx].clamp(max=width - 1).to(device))


def response_logits(model: Any, b: Batch, idx: list[int], device: Any,
                    temperature: float) -> Any:
    """Temperature-scaled logits scoring each response token of rows `idx`: [b, T, V]."""
    import torch

    ids, att, pos = row_inputs(b, idx, device)
    # Only positions from the earliest response start on are needed: skip the rest.
    keep = ids.shape[1] - int(pos[:, 0].min())
    logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
    pos = pos - (ids.shape[1] - keep)
    # Row-and-position indexing, not `gather`: its backward keeps only the [b, T] positions,
    # where gather's would keep a [b, T, V] int64 index (twice the logits' own size).
    picked = logits[torch.arange(len(idx), device=device)[:, None], pos].float()
    return picked / temperature if temperature != 1.0 else picked


def logprobs_of(logits: Any, tokens: Any) -> Any:
    """log softmax(logits)[token] for [b, T, V] logits and [b, T] tokens, with no [b, T, V]
    log-softmax copy (for backward, logsumexp keeps only the logits it already has)."""
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(model: Any, b: Batch, idx: list[int], device: Any,
                   temperature: float) -> Any:
    """The log-prob of each response token of rows `idx`: [b, T]."""
    logits = response_logits(model, b, idx, device, temperature)
    return logprobs_of(logits, b.response_ids[idx].to(device))


def token_values(critic: Any, b: Batch, idx: list[int], device: Any) -> Any:
    """The critic's value of the state before each response token of rows `idx`: [b, T]."""
    ids, att, pos = row_inputs(b, idx, device)
    values = critic(input_ids=ids, attention_mask=att)  # [b, L]
    return values.gather(1, pos).float()


def policy_terms(policy: Any, b: Batch, idx: list[int], col: dict[str, Any], clip_eps: float,
                 device: Any, temperature: float) -> tuple[Any, Any]:
    """(the clipped surrogate of rows `idx` to back-propagate, [loss, clip fraction, approx
    KL, entropy] detached): each a mean over the rows' response tokens."""
    import torch

    from dromedary_ray.algos.rl import entropy_from_logits, masked_mean, ppo_policy_loss

    mask = b.mask[idx].to(device)
    logits = response_logits(policy, b, idx, device, temperature)
    logprobs = logprobs_of(logits, b.response_ids[idx].to(device))
    out = ppo_policy_loss(logprobs, col["policy_logprobs"][idx].to(device),
                          col["advantages"][idx].to(device), mask, clip_eps)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits), mask)
    stats = torch.stack([out.loss.detach(), out.clip_frac, out.approx_kl, entropy])
    return out.loss, stats.double().cpu()


def value_terms(critic: Any, b: Batch, idx: list[int], col: dict[str, Any],
                value_clip_eps: float, device: Any) -> tuple[Any, Any]:
    """(the clipped value loss of rows `idx`, [loss, clip fraction] detached)."""
    from dromedary_ray.algos.rl import ppo_value_loss

    mask = b.mask[idx].to(device)
    loss, clip_frac = ppo_value_loss(token_values(critic, b, idx, device),
                                     col["values"][idx].to(device),
                                     col["returns"][idx].to(device), mask, value_clip_eps)
    return loss, torch.stack([loss.detach(), clip_frac]).double().cpu()


class TokenValues(torch.nn.Module):
    """A one-label sequence classifier (LlamaForSequenceClassification, plain or peft) whose
    forward gives the head's value at every position, [B, L], not the pooled last one.

    A module of its own so that a DeepSpeed engine can wrap it: under ZeRO-3 parameters are
    gathered by hooks around the engine's forward.
    """

    def __init__(self, classifier: Any):
        super().__init__()
        self.inner = classifier  # registered: its parameters are this module's

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        # peft wraps the classifier; the backbone and the (trained copy of the) head sit on the
        # model peft adapts.
        model = self.inner.get_base_model() if hasattr(self.inner, "get_base_model") \
            else self.inner
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask)
        return model.score(hidden.last_hidden_state)[..., 0]


def write_weights_folder(state_dict: dict[str, Any], folder: str) -> str:
    """Full policy weights as `folder/model.safetensors`, written aside and renamed in place,
    for the engines' `reload_weights(weights_path=...)`. Returns `folder`."""
    from safetensors.torch import save_file

    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # Tied embeddings share storage; safetensors refuses shared tensors.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()},
              os.path.join(tmp, "model.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def drop_older_versions(sync_dir: str, prefix: str, keep: str) -> None:
    """Remove `prefix*` folders in `sync_dir` other than `keep`: every engine loaded the
    previous version before this one was written, so nothing reads them any more."""
    if not os.path.isdir(sync_dir):
        return
    for name in os.listdir(sync_dir):
        path = os.path.join(sync_dir, name)
        if name.startswith(prefix) and path != keep and ".tmp-" not in name:
            shutil.rmtree(path, ignore_errors=True)
