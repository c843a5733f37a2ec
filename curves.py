"""Training curves side by side: several runs' metrics.jsonl in one figure, one line per run.

Nine panels against the optimizer step: loss, reward margin, reward accuracy, chosen and rejected log-probs,
held-out reward accuracy and margin, learning rate and gradient norm. The per-step training metrics are smoothed
by a trailing moving average over --smooth steps; the learning rate and the held-out points (step 0, every
eval_steps, the last step) are drawn as logged. A run is labelled by its folder's name, with the method from its
args.json when the name does not already say it. A run that lacks a metric (no held-out pairs, say) is left out
of that panel only.

    python curves.py ckpt/dpo ckpt/simpo ckpt/gammapo                 # writes curves.png
    python curves.py ckpt/* --output docs/curves.png --smooth 1        # every run, no smoothing
"""

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from common import InputError

# (metric key, panel title, smoothed?). Held-out metrics are logged every --eval_steps only: markers, not smoothed.
PANELS = (
    ("loss", "training loss (log scale above 1)", True),
    ("rewards/margin", "reward margin (chosen − rejected)", True),
    ("rewards/accuracy", "reward accuracy (training batch)", True),
    ("logps/chosen", "log-prob of chosen reply (summed)", True),
    ("logps/rejected", "log-prob of rejected reply (summed)", True),
    ("eval/reward_accuracy", "held-out reward accuracy", False),
    ("eval/margin", "held-out reward margin", False),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm before clipping (log above 1)", True),
)
# Losses differ in kind (IPO's is squared) and can run 10-100x the others, and so do their gradient norms: symlog keeps
# values up to 1 linear and readable next to them, and draws a zero (a hinge loss met), which a log scale would drop.
SYMLOG = ("loss", "grad_norm")


@dataclass
class CurvesArgs:
    folders: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="FOLDER [FOLDER ...]")]
    """training runs' --output_dir folders, each with a metrics.jsonl"""
    output: str = "curves.png"
    """where the PNG goes"""
    smooth: int = 5
    """moving average over this many steps for the per-step training metrics (1: as logged)"""


@dataclass
class Run:
    label: str
    records: list[dict]


def read_json(path: Path, line_no: int, text: str):
    try:
        return json.loads(text)
    except ValueError:
        where = f"line {line_no} of {path}" if line_no else str(path)
        raise InputError(f"{where} is not valid JSON; fix or delete it, then rerun") from None


def load_run(folder: Path) -> Run:
    metrics_file = folder / "metrics.jsonl"
    if not metrics_file.is_file():
        raise InputError(f"{folder} has no metrics.jsonl: give training runs' --output_dir folders")
    try:
        lines = metrics_file.read_text().splitlines()
        args_text = (folder / "args.json").read_text() if (folder / "args.json").is_file() else "{}"
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{folder} cannot be read ({e})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if numbered and not numbered[-1][1].endswith("}"):  # a kill while the last line was written: common.py drops it
        numbered.pop()
    records = [read_json(metrics_file, n, line) for n, line in numbered]
    if not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in records):
        raise InputError(f"{metrics_file} has a line that is not a metrics record (a JSON object with a step)")
    if not any(r["step"] > 0 for r in records):
        raise InputError(f"{metrics_file} has no training steps yet")
    saved = read_json(folder / "args.json", 0, args_text)
    method = saved.get("method", "") if isinstance(saved, dict) else ""
    label = folder.resolve().name
    return Run(label if method in label else f"{label} ({method})", records)


def load_runs(folders: list[Path]) -> list[Run]:
    runs = [load_run(folder) for folder in folders]
    if len({run.label for run in runs}) < len(runs):  # e.g. a/dpo and b/dpo: the paths as given tell them apart
        for run, folder in zip(runs, folders):
            run.label = str(folder) + run.label.removeprefix(folder.resolve().name)
    return runs


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values; the first points average what exists so far."""
    smoothed = []
    for i in range(len(values)):
        recent = values[max(0, i + 1 - window) : i + 1]
        smoothed.append(sum(recent) / len(recent))
    return smoothed


def series(run: Run, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in run.records if isinstance(r.get(key), int | float)]
    return [step for step, _ in points], [value for _, value in points]


def run_style(k: int) -> dict:
    """Run k's colour and dash in every panel and the legend: past 10 runs the colours repeat, so the dash changes."""
    return dict(color=f"C{k % 10}", linestyle=("-", "--", ":")[k // 10 % 3])


def draw_panel(ax, runs: list[Run], key: str, title: str, smoothed: bool, smooth: int) -> None:
    """One metric, one line per run that logged it."""
    held_out = key.startswith("eval/")
    for k, run in enumerate(runs):
        steps, values = series(run, key)
        if steps:
            y = moving_average(values, smooth) if smoothed else values
            style = dict(linewidth=0.8, marker="o", markersize=3) if held_out else dict(linewidth=1.2)
            ax.plot(steps, y, **run_style(k), **style)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if key in SYMLOG:
        ax.set_yscale("symlog", linthresh=1)
        low, high = ax.get_ylim()  # ticks 0, 0.5, 1, 3, 10, 30, ...: matplotlib's would leave 0-1 unlabelled
        ax.set_yticks([t for t in [0, 0.5] + [m * 10**e for e in range(12) for m in (1, 3)] if low <= t <= high])
        ax.yaxis.set_major_formatter("{x:g}")
    if key == "lr":  # as flags write it (0.001, 5e-07); matplotlib's shared exponent would sit on the title
        ax.yaxis.set_major_formatter("{x:g}")


def plot(runs: list[Run], output: Path, smooth: int):
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the figure only goes to a file
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.lines import Line2D
    from PIL import Image  # a matplotlib dependency

    figure, axes = plt.subplots(3, 3, figsize=(12, 8), dpi=100, sharex=True)
    for ax, (key, title, smoothed) in zip(axes.flat, PANELS):
        draw_panel(ax, runs, key, title, smoothed, smooth)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=9)
    handles = [Line2D([], [], **run_style(k), label=run.label) for k, run in enumerate(runs)]
    # As many columns as a 12-inch row holds: about 160 characters of 9-point text, 6 of them for each line sample.
    columns = max(1, min(len(runs), 160 // (max(len(run.label) for run in runs) + 6)))
    figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=9, frameon=False)
    smoothing = f"per-step training metrics: moving average over {smooth} steps" if smooth > 1 else "as logged"
    figure.suptitle(f"Training curves ({smoothing}; held-out: markers)", fontsize=12)
    legend_rows = -(-len(runs) // columns)
    figure.tight_layout(rect=(0, 0.015 + 0.035 * legend_rows, 1, 1))  # leave the bottom strip to the legend
    rendered = io.BytesIO()
    figure.savefig(rendered, format="png")
    plt.close(figure)
    # 256 colours draw lines and text the same in a third of the bytes (small enough for a README), unless the palette
    # lost a run's colour (its line hidden under others'), which would make the legend lie: then all colours are kept.
    small = Image.open(rendered).convert("RGB").quantize(colors=256)
    kept = {colour for _, colour in small.convert("RGB").getcolors(256)}
    wanted = {tuple(round(255 * c) for c in to_rgb(run_style(k)["color"])) for k in range(len(runs))}
    output.parent.mkdir(parents=True, exist_ok=True)
    (small if wanted <= kept else Image.open(rendered)).save(output, optimize=True)
    return figure


def curves(args: CurvesArgs):
    if not args.folders:
        raise InputError("give at least one training run's folder, e.g. python curves.py ckpt/dpo ckpt/simpo")
    if args.smooth < 1:
        raise InputError(f"--smooth must be at least 1 (1: no smoothing), got {args.smooth}")
    if not args.output.endswith(".png"):
        raise InputError(f"--output {args.output} must end in .png")
    return plot(load_runs([Path(folder) for folder in args.folders]), Path(args.output), args.smooth)


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(CurvesArgs, args=argv, use_underscores=True, description=__doc__)
    try:
        curves(args)
    except InputError as e:
        print(f"curves: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"curves: {args.output}")


if __name__ == "__main__":
    main()
