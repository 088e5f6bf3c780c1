"""Pure tensor RL functions: loop versus vectorised, and hand-computed cases. Milliseconds."""

import math

import pytest
import torch

from dromedary_ray.algos import rl


def _random_batch(seed: int, batch: int = 8, steps: int = 12):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=g, dtype=torch.float64)
    values = torch.randn(batch, steps, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    mask = (torch.arange(steps)[None, :] < lengths[:, None]).to(torch.float64)
    # Interior gaps too (e.g. tool output inside a response), not only right padding.
    mask[0, 1] = 0.0 if lengths[0] > 2 else mask[0, 1]
    mask[1, :] = 0.0
    mask[1, [0, 3, 4, steps - 1]] = 1.0
    return rewards, values, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_vectorised_matches_loop(seed, gamma, lam):
    rewards, values, mask = _random_batch(seed)
    adv_ref, ret_ref = rl.gae_advantages_loop(rewards, values, mask, gamma, lam)
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, ret_ref, rtol=0, atol=1e-10)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    assert adv[mask == 1].abs().sum() > 0


def test_gae_hand_computed_three_steps_ignores_padding():
    # One response of 3 tokens, then a padded position holding garbage that must not leak in.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    # t=2: delta = 1 - 0.3 = 0.7                        A2 = 0.7
    # t=1: delta = 0.9*0.3 - 0.4 = -0.13                A1 = -0.13 + 0.72*0.7 = 0.374
    # t=0: delta = 0.9*0.4 - 0.5 = -0.14                A0 = -0.14 + 0.72*0.374 = 0.12928
    expected_adv = torch.tensor([[0.12928, 0.374, 0.7, 0.0]], dtype=torch.float64)
    expected_ret = torch.tensor([[0.62928, 0.774, 1.0, 0.0]], dtype=torch.float64)
    for fn in (rl.gae_advantages, rl.gae_advantages_loop):
        adv, ret = fn(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-12)
        torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-12)


def test_gae_with_unit_gamma_lambda_and_zero_values_is_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, _ = rl.gae_advantages(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[6.0, 5.0, 3.0], [4.0, 0.0, 0.0]]))


def test_masked_mean_and_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert rl.masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(rl.masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    assert rl.masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert rl.masked_var(x, mask).item() == pytest.approx(1.0)  # values 1,2,3, unbiased
    w = rl.masked_whiten(x, mask)
    assert rl.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert rl.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    kept = rl.masked_whiten(x, mask, shift_mean=False)
    assert rl.masked_mean(kept, mask).item() == pytest.approx(2.0, abs=1e-6)


def test_ppo_policy_loss_hand_case_with_clipped_and_unclipped_tokens():
    old = torch.zeros(1, 5)
    ratios = torch.tensor([[1.5, 1.1, 0.5, 1.5, 3.0]])
    new = torch.log(ratios).requires_grad_(True)
    adv = torch.tensor([[1.0, 2.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    out = rl.ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
    # token 1: A>0, ratio 1.5 clipped to 1.2        -> -1.2 (clipped branch)
    # token 2: A=2, ratio 1.1 inside the range       -> -2.2
    # token 3: A<0, ratio 0.5 clipped to 0.8         ->  0.8 (clipped branch)
    # token 4: A<0, ratio 1.5, pessimistic unclipped ->  1.5
    assert out.loss.item() == pytest.approx((-1.2 - 2.2 + 0.8 + 1.5) / 4, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(0.5)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 1.1, 0.5, 1.5)) / 4
    assert out.approx_kl.item() == pytest.approx(expected_kl, abs=1e-6)
    out.loss.backward()
    grad = new.grad[0]
    # Clipped tokens and padding carry no gradient; the others d/dlp(-A r)/4 = -A r / 4.
    assert grad[0].item() == 0.0 and grad[2].item() == 0.0 and grad[4].item() == 0.0
    assert grad[1].item() == pytest.approx(-2.0 * 1.1 / 4, abs=1e-6)
    assert grad[3].item() == pytest.approx(1.5 / 4, abs=1e-6)


def test_ppo_policy_loss_is_minus_mean_advantage_on_policy():
    adv = torch.tensor([[0.3, -1.0, 2.0]])
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    out = rl.ppo_policy_loss(lp, lp, adv, torch.ones_like(adv))
    assert out.loss.item() == pytest.approx(-adv.mean().item())
    assert out.clip_frac.item() == 0.0 and out.approx_kl.item() == 0.0


def test_ppo_value_loss_clipping():
    values = torch.tensor([[1.0, 0.6, 0.0, -1.0, 7.0]])
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, frac = rl.ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # clipped values: 0.7, 0.6, 0.3, -0.2 ; squared errors (plain, clipped) and the max:
    # (0, 0.09)->0.09 clipped   (0.16, 0.16)->0.16   (0, 0.09)->0.09 clipped   (1.44, 0.16)->1.44
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.16 + 0.09 + 1.44) / 4, abs=1e-6)
    assert frac.item() == pytest.approx(0.5)


def test_kl_estimators_hand_values():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
    k = rl.kl_estimators(lp, ref)
    ln2 = math.log(2)
    torch.testing.assert_close(k.k1, torch.tensor([[ln2, -ln2, 0.0]]))
    torch.testing.assert_close(k.k2, torch.tensor([[0.5 * ln2**2, 0.5 * ln2**2, 0.0]]))
    torch.testing.assert_close(k.k3, torch.tensor([[0.5 - 1 + ln2, 2 - 1 - ln2, 0.0]]))


def test_kl_estimators_are_nonnegative_zero_when_equal_and_estimate_kl():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    k = rl.kl_estimators(a, b)
    assert (k.k3 >= 0).all() and (k.k2 >= 0).all() and (k.k1 < 0).any()
    same = rl.kl_estimators(a, a)
    assert all((t == 0).all() for t in same)
    # Monte Carlo: tokens sampled from pi, the means of k1 and k3 approach KL(pi || ref).
    pi, ref = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    exact = (pi * (pi / ref).log()).sum().item()
    idx = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    k = rl.kl_estimators(pi.log()[idx], ref.log()[idx])
    assert k.k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k.k3.mean().item() == pytest.approx(exact, abs=0.01)


def test_token_kl_penalty_rewards_put_score_on_last_valid_token():
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-0.5, -2.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-0.5, -1.0, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])  # row 1 has a gap
    scores = torch.tensor([2.0, -1.0])
    out = rl.token_kl_penalty_rewards(scores, lp, ref, mask, beta=0.1)
    expected = torch.tensor([[-0.05, 0.0, 0.05 + 2.0, 0.0], [0.0, 0.0, 0.0 - 1.0, 0.0]])
    torch.testing.assert_close(out, expected)
    k3 = rl.token_kl_penalty_rewards(scores, lp, ref, mask, beta=0.1, estimator="k3")
    assert (k3 * mask <= torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, -1.0, 0.0]])).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        rl.token_kl_penalty_rewards(scores, lp, ref, mask, beta=0.1, estimator="count")
    with pytest.raises(ValueError, match="at least one valid token"):
        rl.token_kl_penalty_rewards(scores, lp, ref, torch.zeros_like(mask), beta=0.1)


def test_entropy_from_logits():
    assert rl.entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    assert rl.entropy_from_logits(torch.tensor([[1e4, 0.0, 0.0]])).item() == pytest.approx(0.0)
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    p = logits.softmax(-1)
    torch.testing.assert_close(rl.entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_bradley_terry_loss_and_accuracy():
    s = torch.tensor([0.3, -2.0, 5.0])
    assert rl.bradley_terry_loss(s, s).item() == pytest.approx(math.log(2))
    one = rl.bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item()
    assert one == pytest.approx(math.log(1 + math.exp(-1)))
    mixed = rl.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item()
    assert mixed == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2)
    acc = rl.pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]))
    assert acc.item() == pytest.approx(1 / 3)  # a tie is not a win


def test_rloo_advantages_hand_case():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [0.0, 1.0, 5.0]])
    expected = torch.tensor([[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0], [-3.0, -1.5, 4.5]])
    torch.testing.assert_close(rl.rloo_advantages(r), expected)
    with pytest.raises(ValueError):
        rl.rloo_advantages(torch.ones(3, 1))


def test_group_normalized_advantages_hand_case():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 0.0, 4.0]])
    out = rl.group_normalized_advantages(r, eps=0.0 + 1e-9)
    torch.testing.assert_close(out[0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(out[1], torch.zeros(3))
    std = math.sqrt(((4 / 3) ** 2 * 2 + (8 / 3) ** 2) / 2)  # unbiased, n - 1 = 2
    torch.testing.assert_close(out[2], torch.tensor([-4 / 3, -4 / 3, 8 / 3]) / std)
    eps_out = rl.group_normalized_advantages(r, eps=1.0)
    torch.testing.assert_close(eps_out[0], torch.tensor([-0.5, 0.0, 0.5]))


def test_length_bonus_and_unfinished_penalty():
    rewards = torch.tensor([1.0, 1.0, 1.0])
    lengths = torch.tensor([10, 100, 50])
    finished = torch.tensor([True, False, True])
    out = rl.length_bonus_and_unfinished_penalty(rewards, lengths, finished, 0.05, 6.0,
                                                 max_bonus=4.0)
    # bonuses 0.5, 5 capped at 4, 2.5; the unfinished response loses 6.
    torch.testing.assert_close(out, torch.tensor([1.5, -1.0, 3.5]))
    uncapped = rl.length_bonus_and_unfinished_penalty(rewards, lengths, finished, 0.05, 0.0)
    torch.testing.assert_close(uncapped, torch.tensor([1.5, 6.0, 3.5]))
    per_prompt = rl.length_bonus_and_unfinished_penalty(
        rewards, lengths, finished, torch.tensor([0.05, 0.05, 0.0]), 6.0, max_bonus=4.0)
    torch.testing.assert_close(per_prompt, torch.tensor([1.5, -1.0, 1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        rl.length_bonus_and_unfinished_penalty(rewards, lengths, finished, 0.05, -6.0)


def test_salmon_length_bonus_constants_reproduce_its_reward():
    # SALMON: reward + 5.0 * min(len / response_len, 0.8), minus 6 when unfinished.
    response_len = 1024
    out = rl.length_bonus_and_unfinished_penalty(
        torch.tensor([0.0, 0.0]), torch.tensor([512, 1024]), torch.tensor([True, False]),
        rl.SALMON_LENGTH_BONUS / response_len, rl.SALMON_UNFINISHED_PENALTY,
        max_bonus=rl.SALMON_LENGTH_BONUS * rl.SALMON_LENGTH_BONUS_CAP)
    torch.testing.assert_close(out, torch.tensor([2.5, 4.0 - 6.0]))
