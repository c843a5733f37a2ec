"""AlphaPO: Reward Shape Matters for LLM Alignment
Gupta et al. (2025), arXiv:2501.03884

    L = -log σ( β · (r(ā_w) - r(ā_l)) - γ ),   r(a) = (1 - e^(-α a)) / α
    ā = log π(y|x) / |y|,   γ = gamma_beta_ratio · β

Eq. 4 of the paper: r(ā) = (1 - π(y|x)^(-α/|y|)) / α, and r(ā) = ā at α = 0, which is SimPO.
Compared with dpo.py:
1. no reference model: the reward is the policy's own log-prob,
2. averaged over completion tokens, not summed,
3. a target margin γ, as simpo.py,
4. the reward is bent by α: its slope e^(-α ā) is larger for less likely replies when α > 0.
We compute r with expm1(-α a), the same quantity, exact as α → 0; never exp(a) ** -α, which
underflows to 0 and gives inf for long replies.

    python alphapo.py --model tiny --data tiny
    torchrun --nproc_per_node 8 alphapo.py --alpha 0.25 --beta 2.5
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import common

NEEDS_REFERENCE = False


@dataclass
class Args(common.TrainArgs):
    alpha: float = 0.25
    """reward shape α; 0 is SimPO (AlphaPO Table 3, Mistral-7B-Instruct)"""
    beta: float = 2.5
    """reward scale β (AlphaPO Table 3, Mistral-7B-Instruct)"""
    gamma_beta_ratio: float = 0.1
    """target margin γ/β (AlphaPO Table 3, Mistral-7B-Instruct)"""
    learning_rate: float = 7e-7
    """peak learning rate (AlphaPO Table 3, Mistral-7B-Instruct)"""


def loss_fn(lp: common.PairLogps, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    chosen = lp.chosen / lp.chosen_len  # [B] average log-prob per completion token
    rejected = lp.rejected / lp.rejected_len
    if args.alpha != 0:  # r(a) = (1 - e^(-α a)) / α, Eq. 4
        chosen = -torch.expm1(-args.alpha * chosen) / args.alpha
        rejected = -torch.expm1(-args.alpha * rejected) / args.alpha
    logits = args.beta * (chosen - rejected) - args.gamma_beta_ratio * args.beta
    losses = -F.logsigmoid(logits)
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


if __name__ == "__main__":
    common.main(Args, loss_fn, needs_reference=NEEDS_REFERENCE)
