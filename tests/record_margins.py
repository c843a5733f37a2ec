"""torchrun worker for test_train.py (not a test itself): trains gammapo.py with the given flags and saves, per
rank, every training-time margin solve (all gaps in, all margins out) and the slice of it the rank used, to
<output_dir>/margins_rank<r>.pt."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import gammapo  # noqa: E402

solves, used = [], []
solve, margins = gammapo.adaptive_margins, gammapo.GapHistory.margins


def recording_solve(gaps, *args):
    result = solve(gaps, *args)
    if torch.is_grad_enabled():  # training (held-out pairs are evaluated under no_grad)
        solves.append((gaps.clone(), result.clone()))
    return result


def recording_margins(self, gaps, gamma0, tau, held_out=False):
    result = margins(self, gaps, gamma0, tau, held_out)
    if not held_out:
        used.append((gaps.detach().clone(), result.clone()))
    return result


gammapo.adaptive_margins, gammapo.GapHistory.margins = recording_solve, recording_margins
args = common.parse_args(gammapo.Args)
common.train(args, gammapo.loss_fn, gammapo.NEEDS_REFERENCE, "gammapo", gammapo.LOSS_STATE)
torch.save({"solves": solves, "used": used}, Path(args.output_dir) / f"margins_rank{os.environ['RANK']}.pt")
