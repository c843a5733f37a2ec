"""Margin-sigmoid: the DPO sigmoid loss, switched off once a pair is learnt past a margin δ
arXiv:2508.08466 (2025) (no published code; title and authors on the arXiv page)

    L = (1 - ε) · relu(ℓ₊ - δ) + ε · relu(ℓ₋ - δ),   ℓ± = -log σ(±β Δ)

Δ as in dpo.py. The paper gives no values for δ and ε: ours are 0.1 and 0.1. Compared with dpo.py:
1. a pair stops contributing, exactly, once its sigmoid loss falls below δ (βΔ ≥ log(1/(e^δ - 1))),
   instead of being pushed further forever,
2. label smoothing ε on by default; with δ = 0 the loss is cDPO (dpo.py with label_smoothing ε).
δ must be below log 2 = ℓ± at Δ = 0, or the loss is zero, and so is its gradient, from the start.

    python margin_sigmoid.py --model tiny --data tiny
    torchrun --nproc_per_node 8 margin_sigmoid.py --beta 0.1
"""

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

import common

NEEDS_REFERENCE = True


@dataclass
class Args(common.TrainArgs):
    beta: float = 0.1
    """reward scale β (arXiv:2508.08466)"""
    delta: float = 0.1
    """δ: sigmoid loss below which a pair is left alone (ours; the paper gives none); must be < log 2"""
    label_smoothing: float = 0.1
    """ε: weight of the flipped-label term (ours; the paper gives none)"""
    learning_rate: float = 5e-7
    """peak learning rate (as dpo.py)"""

    def __post_init__(self):
        if not 0 <= self.delta < math.log(2):
            raise common.InputError(f"--delta {self.delta} must be in [0, log 2 = 0.693): at Δ = 0 the loss is log 2")


def loss_fn(lp: common.PairLogps, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    chosen = lp.chosen - lp.ref_chosen  # [B] log π/π_ref of the chosen reply
    rejected = lp.rejected - lp.ref_rejected
    logits = args.beta * (chosen - rejected)
    loss_right, loss_flipped = -F.logsigmoid(logits), -F.logsigmoid(-logits)  # ℓ₊, ℓ₋
    losses = (1 - args.label_smoothing) * F.relu(loss_right - args.delta)
    losses = losses + args.label_smoothing * F.relu(loss_flipped - args.delta)
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


if __name__ == "__main__":
    common.main(Args, loss_fn, needs_reference=NEEDS_REFERENCE)
