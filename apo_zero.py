"""APO-zero: Anchored Preference Optimization and Contrastive Revisions
D'Oosterlinck, Xu, Develder, Demeester, Singh, Potts, Kiela, Mehri (2024), arXiv:2408.06266

    L = (1 - σ(β ρ_w)) + σ(β ρ_l),   ρ = log π(y|x)/π_ref(y|x)

Eq. 7 of the paper, as TRL's apo_zero loss (with its constant 1, which changes no gradient).
Compared with dpo.py:
1. the chosen and rejected rewards are anchored separately, not through their difference Δ:
   the chosen likelihood is pushed up and the rejected one down, each on its own sigmoid,
2. bounded: each term saturates, so a pair already far apart stops pulling.

    python apo_zero.py --model tiny --data tiny
    torchrun --nproc_per_node 8 apo_zero.py --beta 0.1
"""

from dataclasses import dataclass

import torch
from torch import Tensor

import common

NEEDS_REFERENCE = True


@dataclass
class Args(common.TrainArgs):
    beta: float = 0.1
    """reward scale β (TRL's apo_zero default)"""
    learning_rate: float = 5e-7
    """peak learning rate (TRL's DPO examples)"""


def loss_fn(lp: common.PairLogps, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    chosen = lp.chosen - lp.ref_chosen  # [B] log π/π_ref of the chosen reply
    rejected = lp.rejected - lp.ref_rejected
    losses = (1 - torch.sigmoid(args.beta * chosen)) + torch.sigmoid(args.beta * rejected)  # Eq. 7
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


if __name__ == "__main__":
    common.main(Args, loss_fn, needs_reference=NEEDS_REFERENCE)
