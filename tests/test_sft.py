"""SFT data, padding, data-parallel plans and loss (pure torch, milliseconds; no Ray)."""

import math

import pytest
import torch

from dromedary_ray.algos.sft import (
    IGNORE_INDEX,
    SFTExample,
    build_example,
    collate,
    data_parallel_loss,
    encode_records,
    epoch_rounds,
    masked_copy,
    plan_steps,
    step_targets,
    token_nll_sum,
)

EOS = 2


def test_prompt_is_masked_answer_kept_and_eos_appended():
    ex, cut = build_example([10, 11, 12], [20, 21], EOS, max_seq_len=16)
    assert not cut
    assert ex.input_ids == [10, 11, 12, 20, 21, EOS]
    assert ex.labels == [IGNORE_INDEX] * 3 + [20, 21, EOS]
    assert ex.num_targets == 3


def test_long_answer_is_truncated_and_loses_its_eos():
    ex, cut = build_example([10, 11, 12], [20, 21, 22, 23], EOS, max_seq_len=5)
    assert cut and ex.input_ids == [10, 11, 12, 20, 21]
    assert ex.labels == [IGNORE_INDEX] * 3 + [20, 21]
    # Exactly filling the window (answer + EOS) is not a truncation.
    ex, cut = build_example([10, 11, 12], [20], EOS, max_seq_len=5)
    assert not cut and ex.input_ids[-1] == EOS


def test_prompt_filling_the_window_is_dropped():
    assert build_example([1] * 5, [20], EOS, max_seq_len=5) == (None, False)
    assert build_example([1] * 6, [20], EOS, max_seq_len=5) == (None, False)
    ex, _ = build_example([1] * 4, [20], EOS, max_seq_len=5)
    assert ex is not None and ex.labels == [IGNORE_INDEX] * 4 + [20]


class FakeTokenizer:
    """Whitespace tokenizer with a chat template: enough to check what encode_records sends."""

    eos_token_id = EOS
    chat_template = "fake"

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls: list[tuple[str, bool]] = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        (msg,) = messages
        return f"<user> {msg['content']} <assistant>"

    def __call__(self, text, add_special_tokens):
        self.calls.append((text, add_special_tokens))
        ids = [self.vocab.setdefault(w, len(self.vocab) + 10) for w in text.split()]

        class Out:
            input_ids = ([1] if add_special_tokens else []) + ids

        return Out()


def test_encode_records_uses_the_bare_query_and_counts_what_was_cut():
    tok = FakeTokenizer()
    records = [
        {"query": "hi there", "answer": "hello friend"},
        {"query": " ".join(["w"] * 20), "answer": "too long"},  # prompt > max_seq_len
        {"query": "q", "answer": " ".join(["a"] * 20)},  # answer truncated
    ]
    data = encode_records(tok, records, max_seq_len=10)
    assert [d[0] for d in data.dropped] == [1] and data.dropped[0][1] == 22
    assert data.dropped_prompt_too_long == 1 and data.truncated == 1
    first = data.examples[0]
    assert len(first.input_ids) == 4 + 2 + 1  # <user> hi there <assistant> | hello friend EOS
    assert first.labels[:4] == [IGNORE_INDEX] * 4 and first.labels[-1] == EOS
    assert all(len(e.input_ids) <= 10 for e in data.examples)
    # The chat template writes its own special tokens: the prompt gets none added; the answer
    # is tokenised on its own, never with special tokens.
    assert ("<user> hi there <assistant>", False) in tok.calls
    assert ("hello friend", False) in tok.calls


def test_collate_right_pads_and_masks_padding():
    a = SFTExample([5, 6, 7, EOS], [IGNORE_INDEX, IGNORE_INDEX, 7, EOS])
    b = SFTExample([5, 8], [IGNORE_INDEX, 8])
    batch = collate([a, b], pad_id=EOS)  # pad == EOS, as in SmolLM2
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS], [5, 8, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # The real EOS target of `a` is kept; the pad positions of `b` are ignored.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, EOS],
                                        [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError):
        collate([], pad_id=0)


@pytest.mark.parametrize("n,world,mbs,accum", [(10, 2, 2, 1), (7, 2, 3, 2), (5, 3, 1, 2),
                                               (1, 2, 4, 1), (16, 4, 2, 3)])
def test_plan_covers_every_example_once_per_epoch(n, world, mbs, accum):
    plan = plan_steps(n, world_size=world, micro_batch_size=mbs, grad_accum=accum, epochs=2,
                      seed=3)
    seen = [i for step in plan for rnd in step for shard in rnd for i in shard]
    assert sorted(seen) == sorted(list(range(n)) * 2)
    for step in plan:
        assert 1 <= len(step) <= accum
        for rnd in step:
            assert len(rnd) == world and all(len(s) <= mbs for s in rnd)
            sizes = [len(s) for s in rnd]
            assert max(sizes) - min(sizes) <= 1  # round robin keeps ranks balanced
    # Each epoch's steps hold exactly that epoch's examples (steps never straddle epochs).
    per_epoch = math.ceil(math.ceil(n / (world * mbs)) / accum)
    first = [i for step in plan[:per_epoch] for rnd in step for shard in rnd for i in shard]
    assert sorted(first) == list(range(n))


def test_plan_is_deterministic_shuffled_per_epoch_and_truncated_by_max_steps():
    kw = dict(world_size=2, micro_batch_size=2, grad_accum=1, seed=0)
    assert plan_steps(40, epochs=2, **kw) == plan_steps(40, epochs=2, **kw)
    e0 = epoch_rounds(40, epoch=0, world_size=2, micro_batch_size=2, seed=0)
    e1 = epoch_rounds(40, epoch=1, world_size=2, micro_batch_size=2, seed=0)
    assert e0 != e1
    assert plan_steps(40, epochs=2, max_steps=3, **kw) == plan_steps(40, epochs=2, **kw)[:3]
    with pytest.raises(ValueError):
        plan_steps(0, epochs=1, **kw)


def test_token_nll_sum_shifts_and_ignores_masked_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 1, 2]])
    total, count = token_nll_sum(logits, labels)
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 0, 3] + logp[0, 1, 4] + logp[1, 1, 1] + logp[1, 2, 2])
    assert count == 4 and total.item() == pytest.approx(expected.item(), rel=1e-6)
    # An all-masked example (what an idle rank runs) adds nothing.
    masked = masked_copy(SFTExample([1, 2, 3], [IGNORE_INDEX, 2, 3]))
    assert masked.input_ids == [1, 2, 3] and masked.num_targets == 0
    zero, n = token_nll_sum(logits[:1, :3], torch.tensor([masked.labels]))
    assert n == 0 and zero.item() == 0.0


def _examples(seed: int, n: int, vocab: int) -> list[SFTExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(SFTExample(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out


@pytest.mark.parametrize("world,mbs,accum", [(2, 2, 1), (3, 1, 2), (2, 3, 2)])
def test_sharded_gradients_equal_the_full_batch_mean(world, mbs, accum):
    """Ranks' scaled losses, averaged as a data-parallel engine does, give the same gradient
    as one process taking the mean token loss over the whole step (STYLE.md §2)."""
    vocab = 11
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    examples = _examples(1, 7, vocab)  # 7: the last round leaves some rank idle
    plan = plan_steps(len(examples), world_size=world, micro_batch_size=mbs, grad_accum=accum,
                      epochs=1, seed=0)
    step = plan[0]

    def grads(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return [p.grad.clone() for p in model.parameters()]

    def full():
        batch = collate([examples[i] for rnd in step for s in rnd for i in s], pad_id=0)
        total, count = token_nll_sum(model(batch["input_ids"]), batch["labels"])
        return total / count

    def sharded():
        targets = step_targets(step, examples)
        per_rank = []
        for rank in range(world):
            loss = torch.zeros(())
            for rnd in step:  # micro-batches accumulate by plain addition
                shard = [examples[i] for i in rnd[rank]] or [masked_copy(examples[0])]
                batch = collate(shard, pad_id=0)
                nll, _ = token_nll_sum(model(batch["input_ids"]), batch["labels"])
                loss = loss + data_parallel_loss(nll, targets, world)
            per_rank.append(loss)
        return sum(per_rank) / world  # the all-reduce average over ranks

    for a, b in zip(grads(full), grads(sharded), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
