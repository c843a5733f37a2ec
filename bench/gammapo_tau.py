"""How far gammaPO's per-pair margins γ_i move from γ0 at each τ, measured on the tiny task.

Trains `gammapo.py --model tiny --data tiny` once per τ (its other defaults as they are: β 2.5, γ0 = 0.1 x 2.5 =
0.25) and records the margins each training micro-step gives its pairs. Prints, per τ: the smallest, mean and
largest γ_i over the run, the mean over micro-steps of (largest / smallest γ_i), the share of margins more than 10%
away from γ0, and the final held-out reward accuracy. The solver bounds the ratio of two margins by e^(γ0/τ), so at
γ0 = 0.25 a τ of 3 or 10 (the authors' configs) cannot move them more than a few percent.

    python bench/gammapo_tau.py                      # τ in 0.05 0.1 0.3 1 3 (about 5 minutes on 2 CPU cores)
    python bench/gammapo_tau.py --taus 0.1 --output_dir /tmp/tau
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import gammapo  # noqa: E402


def run(tau: float, output_dir: Path) -> tuple[list[torch.Tensor], dict]:
    """The margins of every training micro-step, and the run's last metrics."""
    used, margins = [], gammapo.GapHistory.margins

    def recording(self, gaps, gamma0, tau, held_out=False):
        result = margins(self, gaps, gamma0, tau, held_out)
        if not held_out:
            used.append(result.detach().clone())
        return result

    gammapo.GapHistory.margins = recording
    try:
        argv = ["--model", "tiny", "--tau", str(tau), "--output_dir", str(output_dir / f"tau{tau:g}")]
        args = common.parse_args(gammapo.Args, argv + ["--save_steps", "0"])
        result = common.train(args, gammapo.loss_fn, gammapo.NEEDS_REFERENCE, "gammapo", gammapo.LOSS_STATE)
    finally:
        gammapo.GapHistory.margins = margins
    return used, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--output_dir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="gammapo_tau_"))
    gamma0 = gammapo.Args.gamma_beta_ratio * gammapo.Args.beta
    rows = []
    for tau in args.taus:
        used, result = run(tau, output_dir)
        every = torch.cat(used)
        ratios = [float(m.max() / m.min()) for m in used]
        far = float(((every - gamma0).abs() > 0.1 * gamma0).float().mean())
        rows.append(
            f"| {tau:g} | {every.min():.3f} | {every.mean():.3f} | {every.max():.3f} | {statistics.mean(ratios):.2f} "
            f"| {far:.0%} | {result['eval/reward_accuracy']:.3f} |"
        )
    print(f"gammapo.py --model tiny, γ0 = {gamma0:g}: margins γ_i of the training pairs over the whole run")
    print(
        "| τ | min γ_i | mean γ_i | max γ_i | mean max/min per micro-step | γ_i off γ0 by > 10% | held-out accuracy |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
