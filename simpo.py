"""SimPO: Simple Preference Optimization with a Reference-Free Reward
Meng, Xia, Chen (2024), arXiv:2405.14734

    L = -log σ( β/|y_w| · log π(y_w|x) - β/|y_l| · log π(y_l|x) - γ ),   γ = gamma_beta_ratio · β

Eq. 6 of the paper, as princeton-nlp/SimPO's simpo_loss. Compared with dpo.py:
1. no reference model: the reward is the policy's own log-prob,
2. averaged over completion tokens, not summed,
3. a target margin γ, set as a ratio of β as in the authors' code (γ itself is the margin: 0.1 x 2.5 = 0.25).

    python simpo.py --model tiny --data tiny
    torchrun --nproc_per_node 8 simpo.py --beta 2.5
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

import common

NEEDS_REFERENCE = False


@dataclass
class Args(common.TrainArgs):
    beta: float = 2.5
    """reward scale β (SimPO README, Mistral-7B-Instruct row)"""
    gamma_beta_ratio: float = 0.1
    """target margin γ/β, so γ = 0.25 (SimPO README, Mistral-7B-Instruct row; the name is the SimPO repo's)"""
    learning_rate: float = 5e-7
    """peak learning rate (SimPO README, Mistral-7B-Instruct row)"""


def loss_fn(lp: common.PairLogps, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    chosen = lp.chosen / lp.chosen_len  # [B] average log-prob per completion token
    rejected = lp.rejected / lp.rejected_len
    logits = args.beta * (chosen - rejected) - args.gamma_beta_ratio * args.beta
    losses = -F.logsigmoid(logits)  # Eq. 6
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


if __name__ == "__main__":
    common.main(Args, loss_fn, needs_reference=NEEDS_REFERENCE)
