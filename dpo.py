"""DPO: Direct Preference Optimization: Your Language Model is Secretly a Reward Model
Rafailov, Sharma, Mitchell, Ermon, Manning, Finn (2023), arXiv:2305.18290

    L = -(1 - ε) log σ(β Δ) - ε log σ(-β Δ),   Δ = log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)

Eq. 7 of the paper; ε > 0 is conservative DPO (cDPO), label smoothing as in TRL's dpo_loss.
This is the base every other method file is compared with:
1. the reward is the summed log-prob ratio against a frozen reference (the initial model),
2. summed over completion tokens, not averaged,
3. no target margin.

    python dpo.py --model tiny --data tiny
    torchrun --nproc_per_node 8 dpo.py --beta 0.01
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

import common

NEEDS_REFERENCE = True


@dataclass
class Args(common.TrainArgs):
    beta: float = 0.01
    """reward scale β (SimPO README, DPO on 7B instruct models)"""
    label_smoothing: float = 0.0
    """ε: assumed probability that a label is flipped (cDPO, TRL's dpo_loss)"""
    learning_rate: float = 5e-7
    """peak learning rate (SimPO README, DPO on 7B instruct models)"""


def loss_fn(lp: common.PairLogps, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    chosen = lp.chosen - lp.ref_chosen  # [B] log π/π_ref of the chosen reply
    rejected = lp.rejected - lp.ref_rejected
    logits = args.beta * (chosen - rejected)
    losses = -(1 - args.label_smoothing) * F.logsigmoid(logits) - args.label_smoothing * F.logsigmoid(-logits)  # Eq. 7
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


if __name__ == "__main__":
    common.main(Args, loss_fn, needs_reference=NEEDS_REFERENCE)
