"""IPO: A General Theoretical Paradigm to Understand Learning from Human Preferences
Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos (2023), arXiv:2310.12036

    L = ( Δ̄ - 1/(2β) )²,   Δ̄ = log π(y_w|x)/π_ref(y_w|x) / |y_w| - log π(y_l|x)/π_ref(y_l|x) / |y_l|

Eq. 17 of the paper, with β as its τ. The paper sums log-probs over tokens; we average them per
token, as TRL's ipo loss does (its authors confirmed this reading with the IPO authors): with sums
the target 1/(2β) would mean something different for a 10-token and a 1000-token reply.
Compared with dpo.py:
1. a squared loss that pulls Δ̄ to the target 1/(2β) instead of pushing it to infinity,
2. log-ratios averaged over completion tokens, not summed.

    python ipo.py --model tiny --data tiny
    torchrun --nproc_per_node 8 ipo.py --beta 0.1
"""

from dataclasses import dataclass

from torch import Tensor

import common

NEEDS_REFERENCE = True


@dataclass
class Args(common.TrainArgs):
    beta: float = 0.1
    """regularisation β (τ in the paper): the target gap is 1/(2β) (TRL's ipo default)"""
    learning_rate: float = 5e-7
    """peak learning rate (TRL's DPO/IPO examples)"""


def loss_fn(lp: common.PairLogps, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    chosen = (lp.chosen - lp.ref_chosen) / lp.chosen_len  # [B] log π/π_ref per completion token
    rejected = (lp.rejected - lp.ref_rejected) / lp.rejected_len
    logits = chosen - rejected
    losses = (logits - 1 / (2 * args.beta)) ** 2  # Eq. 17
    return losses, args.beta * chosen.detach(), args.beta * rejected.detach()


if __name__ == "__main__":
    common.main(Args, loss_fn, needs_reference=NEEDS_REFERENCE)
