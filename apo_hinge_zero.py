"""APO-hinge-zero: anchored preference optimisation with hinges instead of sigmoids
arXiv:2508.08466 (2025), Eq. 11 (no published code; title and authors on the arXiv page)

    L = relu(m - β ρ_w) + relu(m + β ρ_l),   ρ = log π(y|x)/π_ref(y|x)

β is applied once, inside each hinge, as Eq. 11 writes it. Compared with dpo.py:
1. like apo_zero.py, the chosen and rejected rewards are anchored separately, not through Δ,
2. hinges: a pair stops contributing, exactly, once β ρ_w ≥ m and β ρ_l ≤ -m,
3. a margin m that each reward must clear on its own side of zero.

    python apo_hinge_zero.py --model tiny --data tiny
    torchrun --nproc_per_node 8 apo_hinge_zero.py --beta 0.1
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

import common

NEEDS_REFERENCE = True


@dataclass
class Args(common.TrainArgs):
    beta: float = 0.1
    """reward scale β (arXiv:2508.08466, as apo_zero)"""
    margin: float = 1.0
    """m: how far above (chosen) and below (rejected) zero each scaled reward must get (arXiv:2508.08466)"""
    learning_rate: float = 5e-7
    """peak learning rate (as dpo.py)"""


def loss_fn(lp: common.PairLogps, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    chosen = lp.chosen - lp.ref_chosen  # [B] log π/π_ref of the chosen reply
    rejected = lp.rejected - lp.ref_rejected
    losses = F.relu(args.margin - args.beta * chosen) + F.relu(args.margin + args.beta * rejected)  # Eq. 11
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


if __name__ == "__main__":
    common.main(Args, loss_fn, needs_reference=NEEDS_REFERENCE)
