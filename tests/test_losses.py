"""Losses against values worked out by hand (in each test's docstring) and against their invariants."""

import math

import pytest
import torch

import common
import dpo


def pair_logps(chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_len=None, rejected_len=None):
    t = lambda x: None if x is None else torch.tensor(x, dtype=torch.float32)  # noqa: E731
    ones = [1.0] * len(chosen)
    return common.PairLogps(
        t(chosen), t(rejected), t(ref_chosen), t(ref_rejected), t(chosen_len or ones), t(rejected_len or ones)
    )


def test_dpo_at_reference_is_ln2():
    """Policy = reference: Δ = 0, so every pair's loss is -log σ(0) = ln 2 and both rewards are 0."""
    lp = pair_logps([-10.0, -3.0], [-7.0, -30.0], [-10.0, -3.0], [-7.0, -30.0])
    losses, chosen_rewards, rejected_rewards = dpo.loss_fn(lp, dpo.Args(beta=0.1))
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    assert chosen_rewards.tolist() == [0.0, 0.0] and rejected_rewards.tolist() == [0.0, 0.0]


def test_dpo_hand_values():
    """β = 0.5. Pair 1: ρw = -8 - (-10) = 2, ρl = -7 - (-7) = 0, βΔ = 1 → -log σ(1) = log(1 + e^-1) = 0.3132617.
    Pair 2: ρw = 0, ρl = -4 - 0 = -4, βΔ = 2 → log(1 + e^-2) = 0.1269280.
    Pair 3: ρw = -2, ρl = 0, βΔ = -1 → log(1 + e^1) = 1.3132617.
    Rewards βρ: (1, 0), (0, -2), (-1, 0)."""
    lp = pair_logps([-8.0, 0.0, -12.0], [-7.0, -4.0, -7.0], [-10.0, 0.0, -10.0], [-7.0, 0.0, -7.0])
    losses, chosen_rewards, rejected_rewards = dpo.loss_fn(lp, dpo.Args(beta=0.5))
    torch.testing.assert_close(losses, torch.tensor([0.3132617, 0.1269280, 1.3132617]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([0.0, -2.0, 0.0]))


def test_dpo_label_smoothing_hand_value():
    """ε = 0.1, βΔ = 1: 0.9 · log(1 + e^-1) + 0.1 · log(1 + e^1) = 0.9 · 0.3132617 + 0.1 · 1.3132617 = 0.4132617."""
    lp = pair_logps([-8.0], [-7.0], [-10.0], [-7.0])
    losses, _, _ = dpo.loss_fn(lp, dpo.Args(beta=0.5, label_smoothing=0.1))
    torch.testing.assert_close(losses, torch.tensor([0.4132617]))


def test_dpo_monotone_in_chosen():
    """ε = 0: raising the chosen log-prob never raises the loss, and the rewards are detached."""
    chosen = torch.linspace(-20, 5, 26, requires_grad=True)
    n = chosen.shape[0]
    minus5 = torch.full((n,), -5.0)
    lp = common.PairLogps(chosen, minus5, minus5, minus5, torch.ones(n), torch.ones(n))
    losses, chosen_rewards, rejected_rewards = dpo.loss_fn(lp, dpo.Args(beta=0.3))
    assert (losses[1:] <= losses[:-1]).all()
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert (chosen.grad < 0).all()


def test_cdpo_minimum():
    """With ε > 0 the loss -(1-ε) log σ(z) - ε log σ(-z) has its minimum where σ(z) = 1 - ε,
    i.e. z = βΔ = log((1-ε)/ε): cDPO stops pushing once the margin matches the label noise."""
    eps, beta = 0.2, 0.5
    z = torch.linspace(-1, 4, 5001)
    lp = pair_logps((z / beta).tolist(), [0.0] * len(z), [0.0] * len(z), [0.0] * len(z))
    losses, _, _ = dpo.loss_fn(lp, dpo.Args(beta=beta, label_smoothing=eps))
    assert z[losses.argmin()].item() == pytest.approx(math.log((1 - eps) / eps), abs=2e-3)
