"""Losses against values worked out by hand (in each test's docstring) and against their invariants."""

import math

import pytest
import torch

import alphapo
import apo_hinge_zero
import apo_zero
import common
import dpo
import gammapo
import ipo
import margin_sigmoid
import simpo


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


# ---- ipo ----


def test_ipo_hand_values():
    """β = 0.1, so the target is 1/(2β) = 5. Pair 1: ρw = 6 over 2 tokens = 3 per token, ρl = -4 over 4 tokens
    = -1 per token, Δ̄ = 4 → (4 - 5)² = 1 (summed log-ratios would give Δ = 10 → 25). Pair 2: Δ̄ = 2.5 - (-2.5)
    = 5 → 0. Rewards β·ρ/L: (0.3, -0.1) and (0.25, -0.25)."""
    lp = pair_logps([-4.0, 0.0], [-9.0, -5.0], [-10.0, -5.0], [-5.0, 0.0], [2.0, 2.0], [4.0, 2.0])
    losses, chosen_rewards, rejected_rewards = ipo.loss_fn(lp, ipo.Args(beta=0.1))
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.3, 0.25]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.1, -0.25]))


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_ipo_minimum_at_one_over_two_beta(beta):
    """The loss is smallest (zero) where the per-token gap Δ̄ equals 1/(2β), and grows on both sides."""
    gaps = torch.linspace(-2, 8, 10001)
    lp = pair_logps((3 * gaps).tolist(), [0.0] * len(gaps), [0.0] * len(gaps), [0.0] * len(gaps), [3.0] * len(gaps))
    losses, _, _ = ipo.loss_fn(lp, ipo.Args(beta=beta))
    assert gaps[losses.argmin()].item() == pytest.approx(1 / (2 * beta), abs=1e-3)
    assert losses.min().item() == pytest.approx(0.0, abs=1e-6)


# ---- simpo ----


def test_simpo_hand_values():
    """β = 2, γ/β = 0.5 so γ = 1. Pair 1: āw = -2/4 = -0.5, āl = -6/4 = -1.5, β(āw - āl) - γ = 2 - 1 = 1
    → log(1 + e^-1) = 0.3132617. Pair 2: āw = -3/3 = -1, āl = -3/2 = -1.5, 2 · 0.5 - 1 = 0 → ln 2 = 0.6931472.
    Rewards βā: (-1, -3) and (-2, -3). No reference is read."""
    lp = pair_logps([-2.0, -3.0], [-6.0, -3.0], chosen_len=[4.0, 3.0], rejected_len=[4.0, 2.0])
    losses, chosen_rewards, rejected_rewards = simpo.loss_fn(lp, simpo.Args(beta=2.0, gamma_beta_ratio=0.5))
    torch.testing.assert_close(losses, torch.tensor([0.3132617, math.log(2)]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-3.0, -3.0]))


# ---- apo_zero ----


def test_apo_zero_hand_values():
    """β = 0.1. Pair 1 at the reference: (1 - σ(0)) + σ(0) = 1. Pair 2: ρw = 10, ρl = -10:
    (1 - σ(1)) + σ(-1) = 2 · 0.2689414 = 0.5378828. Pair 3: ρw = -10, ρl = 10: 2 · σ(1) = 1.4621172."""
    lp = pair_logps([-5.0, 0.0, -20.0], [-5.0, -20.0, 0.0], [-5.0, -10.0, -10.0], [-5.0, -10.0, -10.0])
    losses, chosen_rewards, rejected_rewards = apo_zero.loss_fn(lp, apo_zero.Args(beta=0.1))
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.5378828, 1.4621172]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.0, 1.0, -1.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([0.0, -1.0, 1.0]))


def test_apo_zero_anchors_each_side():
    """Unlike DPO, raising both log-probs by the same amount is not free: the chosen term falls, the rejected
    term rises, and the gradient pushes the chosen up and the rejected down on their own."""
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    zero = torch.zeros(1)
    losses, _, _ = apo_zero.loss_fn(common.PairLogps(chosen, rejected, zero, zero, zero + 1, zero + 1), apo_zero.Args())
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.1 * 0.25) and rejected.grad.item() == pytest.approx(0.1 * 0.25)


# ---- apo_hinge_zero ----


def test_apo_hinge_zero_hand_values():
    """β = 0.1, m = 1. At the reference: relu(1) + relu(1) = 2. ρw = 5, ρl = -5: relu(0.5) + relu(0.5) = 1.
    ρw = 5, ρl = -20: relu(0.5) + relu(1 - 2) = 0.5."""
    lp = pair_logps([0.0, 5.0, 5.0], [0.0, -5.0, -20.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    losses, chosen_rewards, rejected_rewards = apo_hinge_zero.loss_fn(lp, apo_hinge_zero.Args(beta=0.1, margin=1.0))
    torch.testing.assert_close(losses, torch.tensor([2.0, 1.0, 0.5]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.0, 0.5, 0.5]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([0.0, -0.5, -2.0]))


def test_apo_hinge_zero_is_exactly_zero_once_both_hinges_hold():
    """βρw ≥ m and βρl ≤ -m: loss and gradient are exactly 0 (a hinge, not a sigmoid that only approaches 0)."""
    chosen = torch.tensor([10.0, 25.0, 100.0], requires_grad=True)
    rejected = torch.tensor([-10.0, -40.0, -11.0], requires_grad=True)
    zero, ones = torch.zeros(3), torch.ones(3)
    lp = common.PairLogps(chosen, rejected, zero, zero, ones, ones)
    losses, _, _ = apo_hinge_zero.loss_fn(lp, apo_hinge_zero.Args(beta=0.1, margin=1.0))
    assert losses.tolist() == [0.0, 0.0, 0.0]
    losses.sum().backward()
    assert chosen.grad.tolist() == [0.0, 0.0, 0.0] and rejected.grad.tolist() == [0.0, 0.0, 0.0]


# ---- margin_sigmoid ----


def test_margin_sigmoid_hand_values():
    """β = 0.1, δ = 0.1, ε = 0.1. Δ = 0: ℓ± = ln 2, 0.9 (ln 2 - 0.1) + 0.1 (ln 2 - 0.1) = ln 2 - 0.1 = 0.5931472.
    Δ = 10 (βΔ = 1): ℓ₊ = 0.3132617, ℓ₋ = 1.3132617, 0.9 · 0.2132617 + 0.1 · 1.2132617 = 0.3132617.
    Δ = 30 (βΔ = 3): ℓ₊ = log(1 + e^-3) = 0.0485874 < δ, so only 0.1 · (3.0485874 - 0.1) = 0.2948587 is left."""
    lp = pair_logps([0.0, 10.0, 30.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    args = margin_sigmoid.Args(beta=0.1, delta=0.1, label_smoothing=0.1)
    losses, chosen_rewards, _ = margin_sigmoid.loss_fn(lp, args)
    torch.testing.assert_close(losses, torch.tensor([math.log(2) - 0.1, 0.3132617, 0.2948587]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.0, 1.0, 3.0]))


def test_margin_sigmoid_with_zero_delta_is_cdpo():
    """δ = 0: (1-ε)·relu(ℓ₊) + ε·relu(ℓ₋) = (1-ε) ℓ₊ + ε ℓ₋, which is dpo.py with label_smoothing ε."""
    torch.manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(64) * 20 for _ in range(4))
    lp = common.PairLogps(chosen, rejected, ref_chosen, ref_rejected, torch.ones(64), torch.ones(64))
    ours = margin_sigmoid.loss_fn(lp, margin_sigmoid.Args(beta=0.3, delta=0.0, label_smoothing=0.2))
    cdpo = dpo.loss_fn(lp, dpo.Args(beta=0.3, label_smoothing=0.2))
    for a, b in zip(ours, cdpo):
        torch.testing.assert_close(a, b)


def test_margin_sigmoid_rejects_delta_of_log_two_or_more():
    with pytest.raises(common.InputError, match=r"--delta 0.7 must be in \[0, log 2"):
        margin_sigmoid.Args(delta=0.7)


# ---- alphapo ----


def test_alphapo_hand_values():
    """α = 1, β = 1, γ/β = 0 so γ = 0. āw = -ln 2 / 1 → r = 1 - e^(ln 2) = 1 - 2 = -1; āl = -ln 4 → r = 1 - 4 = -3;
    β(r_w - r_l) = 2 → log(1 + e^-2) = 0.1269280. Rewards βr: -1 and -3."""
    lp = pair_logps([-math.log(2)], [-2 * math.log(4)], chosen_len=[1.0], rejected_len=[2.0])
    losses, chosen_rewards, rejected_rewards = alphapo.loss_fn(
        lp, alphapo.Args(alpha=1.0, beta=1.0, gamma_beta_ratio=0.0)
    )
    torch.testing.assert_close(losses, torch.tensor([0.1269280]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([-1.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-3.0]))


@pytest.mark.parametrize("alpha", [0.0, 1e-7, -1e-7])
def test_alphapo_tends_to_simpo_as_alpha_goes_to_zero(alpha):
    """r(a) = (1 - e^(-αa))/α → a as α → 0: losses and rewards equal SimPO's with the same β and γ/β."""
    torch.manual_seed(0)
    lens = torch.randint(1, 500, (2, 32)).float()
    lp = common.PairLogps(-torch.rand(32) * lens[0] * 3, -torch.rand(32) * lens[1] * 3, None, None, lens[0], lens[1])
    ours = alphapo.loss_fn(lp, alphapo.Args(alpha=alpha, beta=2.5, gamma_beta_ratio=0.1))
    reference = simpo.loss_fn(lp, simpo.Args(beta=2.5, gamma_beta_ratio=0.1))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_alphapo_long_unlikely_reply_stays_finite():
    """ā = -200 nats per token: exp(a) ** -α would be 0 ** -α = inf; expm1 keeps r finite (-(e^50 - 1)/0.25)."""
    lp = pair_logps([-200.0 * 1000], [-1.0], chosen_len=[1000.0], rejected_len=[1.0])
    losses, chosen_rewards, _ = alphapo.loss_fn(lp, alphapo.Args(alpha=0.25, beta=2.5))
    assert torch.isfinite(losses).all() and torch.isfinite(chosen_rewards).all()


# ---- gammapo ----

GAPS = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0])


@pytest.mark.parametrize(
    "gamma0, tau, expected",
    [
        (0.625, 3.0, [0.577807, 0.600283, 0.615092, 0.657716, 0.674104]),
        (0.625, 0.25, [0.235960, 0.372111, 0.475379, 0.882146, 1.159405]),
        (1.0, 0.1, [0.070478, 0.304863, 0.553623, 1.622106, 2.448930]),
    ],
)
def test_adaptive_margins_reproduce_the_official_solver(gamma0, tau, expected):
    """Expected values from running the loop in SPEC §3.1 (the authors' get_gamma_dq) by hand in plain Python
    floats, and cross-checked with the authors' torch loop copied verbatim: lr = min(0.5/τ, 1), p = 1/N, 20 passes of
    γ = γ0 N p; grad = τ(1 + log(N(p + 1e-10))) + γ0/(1 + e^(g - γ)); p ← p e^(-lr · grad), normalised; return the
    last pass's γ. Gaps (-1, 0, 0.5, 2, 3)."""
    margins = gammapo.adaptive_margins(GAPS, gamma0, tau)
    torch.testing.assert_close(margins, torch.tensor(expected), rtol=0, atol=2e-6)


@pytest.mark.parametrize("tau", [0.05, 0.5, 3.0, 100.0])
def test_adaptive_margins_mean_is_gamma0_and_grows_with_the_gap(tau):
    torch.manual_seed(0)
    gaps = torch.randn(256) * 2
    margins = gammapo.adaptive_margins(gaps, 0.625, tau)
    assert margins.mean().item() == pytest.approx(0.625, rel=1e-6)
    order = gaps.argsort()
    assert (margins[order].diff() >= 0).all()  # larger gap, larger margin
    assert not margins.requires_grad


def test_gammapo_tends_to_simpo_with_gamma0_as_tau_grows():
    """τ → ∞: the entropy term pins p to uniform, so every γ_i = γ0 and the loss is SimPO's."""
    gammapo.LOSS_STATE.reset(0)
    torch.manual_seed(0)
    lens = torch.randint(1, 50, (2, 16)).float()
    lp = common.PairLogps(-torch.rand(16) * lens[0] * 3, -torch.rand(16) * lens[1] * 3, None, None, lens[0], lens[1])
    ours = gammapo.loss_fn(lp, gammapo.Args(beta=2.5, gamma_beta_ratio=0.25, tau=1e9))
    reference = simpo.loss_fn(lp, simpo.Args(beta=2.5, gamma_beta_ratio=0.25))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_gammapo_hand_values():
    """One pair and an empty history: N = 1, p = 1, so γ = γ0 = 0.5 · 2 = 1. āw = -0.5, āl = -1.5, g = 2 · 1 = 2,
    -log σ(2 - 1) = 0.3132617. Then the pair's gap (2) is in the history: a second pair with the same gap is
    solved together with it, N = 2, equal gaps get equal margins, so γ = γ0 again."""
    gammapo.LOSS_STATE.reset(0)
    lp = pair_logps([-2.0], [-6.0], chosen_len=[4.0], rejected_len=[4.0])
    args = gammapo.Args(beta=2.0, gamma_beta_ratio=0.5, tau=3.0)
    for _ in range(2):
        losses, chosen_rewards, rejected_rewards = gammapo.loss_fn(lp, args)
        torch.testing.assert_close(losses, torch.tensor([0.3132617]))
    assert gammapo.LOSS_STATE.gaps.tolist() == [2.0, 2.0]
    torch.testing.assert_close(chosen_rewards, torch.tensor([-1.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-3.0]))


def test_gammapo_clear_pairs_get_larger_margins_than_ambiguous_ones():
    """Per-pair loss is -log σ(g - γ_i): against SimPO's fixed γ0, the ambiguous pair (small gap) is pushed
    less (its margin is below γ0) and the clear pair more."""
    gammapo.LOSS_STATE.reset(0)
    lp = pair_logps([-1.0, -1.0], [-1.2, -3.0])  # gaps 2.5 · 0.2 = 0.5 and 2.5 · 2 = 5
    margins = gammapo.LOSS_STATE.margins(torch.tensor([0.5, 5.0]), 0.625, 0.5)
    assert margins[0] < 0.625 < margins[1]
    gammapo.LOSS_STATE.reset(0)
    ours, _, _ = gammapo.loss_fn(lp, gammapo.Args(tau=0.5))
    fixed, _, _ = simpo.loss_fn(lp, simpo.Args())
    assert ours[0] < fixed[0] and ours[1] > fixed[1]


def test_gap_history_samples_caps_and_skips_held_out(monkeypatch):
    """Each training call solves over its B gaps plus min(history, 256 - B) sampled past ones, then appends its
    gaps (FIFO, 2048 kept). Held-out calls solve their gaps alone and append nothing.
    Same seed, same samples; a saved and reloaded state continues identically."""
    solved_sizes = []
    solve = gammapo.adaptive_margins
    monkeypatch.setattr(gammapo, "adaptive_margins", lambda g, *a: solved_sizes.append(len(g)) or solve(g, *a))
    history = gammapo.GapHistory(seed=1)
    for _ in range(150):
        history.margins(torch.randn(16), 0.625, 3.0)
    assert solved_sizes[:3] == [16, 32, 48] and solved_sizes[-1] == 256
    assert len(history.gaps) == 2048
    before = history.gaps.clone()
    history.margins(torch.randn(500), 0.625, 3.0, held_out=True)
    assert solved_sizes[-1] == 500 and torch.equal(history.gaps, before)

    state = history.state_dict()
    gaps = torch.randn(16)
    first = [history.margins(gaps, 0.625, 3.0) for _ in range(3)]
    restored = gammapo.GapHistory(seed=7)
    restored.load_state_dict(state)
    for expected in first:
        torch.testing.assert_close(restored.margins(gaps, 0.625, 3.0), expected, rtol=0, atol=0)
