"""γ-PO: Robust Preference Optimization via Dynamic Target Margins
Sun et al. (2025, ACL), arXiv:2506.03690; the authors' code is sunjie279/gammaPO ("gm-simpo")

    L = -log σ( g_i - γ_i ),   g_i = β/|y_w| · log π(y_w|x) - β/|y_l| · log π(y_l|x)
    γ_i = γ0 · N · p_i,   p = argmin over the simplex of  1/N Σ_i -log σ(g_i - γ0 N p_i) + τ Σ_i p_i log(N p_i)

SimPO with a margin per pair instead of one γ0 = gamma_beta_ratio · β for all. Compared with dpo.py:
1. no reference model, log-probs averaged over completion tokens, as simpo.py,
2. a target margin γ_i per pair, averaging γ0: larger for clear pairs (large gap g_i), smaller for
   ambiguous ones, which are more likely mislabelled; τ → ∞ gives every pair γ0, i.e. SimPO,
3. state: γ is solved (20 mirror-descent steps, as the authors' code) over this micro-step's gaps
   from every rank plus up to 256 - B past gaps sampled from the last 2048 (seeded; saved in checkpoints).

τ sets how far the margins move: the largest γ_i is at most e^(γ0/τ) times the smallest. At γ0 = 0.25 the authors' τ
(3 for Qwen2.5-7B, 10 for Mistral-7B) keeps every margin within a few percent of γ0, which is SimPO. Measured on the
tiny task (bench/gammapo_tau.py), largest / smallest γ_i per micro-step: τ 3: 1.06, τ 1: 1.20, τ 0.3: 1.85, τ 0.1:
5.2. The default τ 0.3 lets margins range from about 0.5 to 1.4 x γ0 (logged each step: gamma_i/min, /mean, /max).

The history is one queue for all GPUs (every rank's gaps gathered), where the authors keep one per GPU (2048 each,
started from 8 random gaps, not checkpointed): every rank solves the same problem and a resumed run continues exactly,
but the history spans the last 2048 pairs, not 2048 x GPUs. Held-out pairs (lp.held_out) never enter it.

    python gammapo.py --model tiny --data tiny
    torchrun --nproc_per_node 8 gammapo.py --beta 2.5
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import common

NEEDS_REFERENCE = False
HISTORY_SIZE = 2048  # past gaps kept (authors' code)
SOLVE_SIZE = 256  # gaps per solve: this micro-step's plus sampled past ones (authors' code)


def adaptive_margins(reward_gaps: Tensor, gamma0: float, tau: float, n_iters: int = 20) -> Tensor:
    """γ_i for the gaps g_i [N]: the authors' solver, in float64 and detached; mean γ_i = γ0."""
    gaps = reward_gaps.detach().double()
    n = gaps.numel()
    lr = min(0.5 / tau, 1.0)
    p = torch.full_like(gaps, 1 / n)
    for _ in range(n_iters):
        gamma = gamma0 * n * p  # the value returned is the one from the last pass, before its update
        grad = tau * (1 + torch.log(n * (p + 1e-10))) + gamma0 / (1 + torch.exp(gaps - gamma))
        p = p * torch.exp(-lr * grad)
        p = p / p.sum()
    return gamma.to(torch.promote_types(reward_gaps.dtype, torch.float32))


class GapHistory:
    """The loss's one piece of state: recent training gaps, identical on every rank."""

    def __init__(self, seed: int = 0):
        self.reset(seed)

    def reset(self, seed: int) -> None:
        self.gaps = torch.zeros(0, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)  # same seed on every rank: same samples
        self.solved = []  # this step's γ_i, every rank's pairs: the spread metrics() reports

    def metrics(self) -> dict:  # logged with each step: the spread of its margins, the same on every rank
        gammas, self.solved = torch.cat(self.solved), []
        return {f"gamma_i/{name}": getattr(gammas, name)().item() for name in ("min", "mean", "max")}

    def state_dict(self) -> dict:
        return {"gaps": self.gaps.cpu(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gaps = state["gaps"]
        self.generator.set_state(state["generator"])

    def margins(self, gaps: Tensor, gamma0: float, tau: float, held_out: bool = False) -> Tensor:
        if held_out:  # held-out evaluation: all pairs at once, history untouched
            return adaptive_margins(gaps, gamma0, tau)
        every_rank = gaps.detach().double()  # [world · B], rank 0's first
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(every_rank) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, every_rank)
            every_rank = torch.cat(parts)
        self.gaps = self.gaps.to(every_rank.device)  # kept where the gaps are: no host sync per micro-step
        n_past = max(0, min(len(self.gaps), SOLVE_SIZE - len(every_rank)))
        sample = torch.randperm(len(self.gaps), generator=self.generator)[:n_past]
        solved = adaptive_margins(torch.cat([every_rank, self.gaps[sample.to(self.gaps.device)]]), gamma0, tau)
        self.solved.append(solved[: len(every_rank)])
        self.gaps = torch.cat([self.gaps, every_rank])[-HISTORY_SIZE:]
        rank = dist.get_rank() if dist.is_initialized() else 0
        return solved[rank * len(gaps) : (rank + 1) * len(gaps)].to(gaps.dtype)


LOSS_STATE = GapHistory()  # common.train resets it with --seed and checkpoints it


@dataclass
class Args(common.TrainArgs):
    beta: float = 2.5
    """reward scale β (as simpo.py: SimPO README, Mistral-7B-Instruct row)"""
    gamma_beta_ratio: float = 0.1
    """mean target margin γ0/β, so γ0 = 0.25 (as simpo.py: SimPO README, Mistral-7B-Instruct row)"""
    tau: float = 0.3
    """τ: weight of the entropy term; large τ keeps every margin near γ0 (minpo's, measured: see above)"""
    learning_rate: float = 5e-7
    """peak learning rate (as simpo.py: SimPO README, Mistral-7B-Instruct row)"""


def loss_fn(lp: common.PairLogps, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    chosen = lp.chosen / lp.chosen_len  # [B] average log-prob per completion token
    rejected = lp.rejected / lp.rejected_len
    gaps = args.beta * (chosen - rejected)  # g_i
    margins = LOSS_STATE.margins(gaps, args.gamma_beta_ratio * args.beta, args.tau, lp.held_out)  # γ_i, no gradient
    losses = -F.logsigmoid(gaps - margins)
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


if __name__ == "__main__":
    common.main(Args, loss_fn, needs_reference=NEEDS_REFERENCE, loss_state=LOSS_STATE)
