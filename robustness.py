"""Label-noise robustness: every method over a grid of flipped-label fractions p and seeds, in one command.

Each cell trains one method with `--flip_frac p --seed s` (chosen and rejected swapped in a seeded fraction p
of the training pairs, never in the held-out ones) and records its final held-out metrics: the ones that mean the
same for every method (accuracy by log π/π_0 and by mean log-prob per token, the change of the chosen and rejected
replies' log-prob per token since step 0) and, on the tiny task, the generated-reply score (eval.py's generation,
judged by the task's rule: 0.5 ignores the request, 1.0 follows it). The study folder gets `results.jsonl` (one line
per finished cell), `table.md` (per metric, mean and 95% t interval over seeds, and at which p the methods are told
apart; then gammaPO's margins) and `plot.png` (one panel per metric, methods side by side, intervals drawn), all
rewritten after every cell. Running the same command again skips finished cells; an interrupted cell resumes from
its checkpoint. A cell that fails is recorded in `failures.jsonl` with the end of its log, the others still run,
and the command then exits with status 1.

    python robustness.py                                     # 8 methods x 2 p x 6 seeds on the tiny task (CPU)
    python robustness.py --methods dpo simpo --seeds 1       # a subset
    python robustness.py -- --select_frac 0.5                # flags after -- go to every training run
    python robustness.py --model Qwen/Qwen2.5-0.5B-Instruct --data HuggingFaceH4/ultrafeedback_binarized \\
        --nproc_per_node 8 --output_dir study/qwen -- --max_train_samples 20000
"""

import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro
from tqdm import tqdm

from common import REPO_DIR, InputError

METHODS = ("dpo", "ipo", "simpo", "apo_zero", "apo_hinge_zero", "margin_sigmoid", "gammapo", "alphapo")
SET_BY_STUDY = ("--flip_frac", "--seed", "--output_dir", "--resume", "--model", "--data")
KEPT_FILES = ("metrics.jsonl", "args.json", "train.log", "replies.jsonl")  # weights go unless --keep_models
METRICS = {  # the held-out metrics that mean the same for every method (common.evaluate), and what they are called
    "log_ratio_accuracy": "accuracy by log π/π_0, summed over the reply",
    "avg_logp_accuracy": "accuracy by mean log-prob per token",
    "reply_score": "generated-reply score (0.5: ignores the request)",
    "chosen_logp_change": "chosen reply: change of log-prob per token",
    "rejected_logp_change": "rejected reply: change of log-prob per token",
}


@dataclass
class StudyArgs:
    methods: tuple[str, ...] = METHODS
    """method files to train (without .py)"""
    flip_fracs: tuple[float, ...] = (0.2, 0.3)
    """fractions p of training labels swapped, each in [0, 1); on the tiny task the methods split at 0.2-0.3 (below
    every one stays near 1, above every one falls to chance), so the default spends its runs there, on seeds"""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    """seeds: the flipped pairs, the data order and (for --model tiny) the initial model all change with it"""
    model: str = "tiny"
    """--model of every run"""
    data: str = "tiny"
    """--data of every run"""
    output_dir: str = "study/robustness"
    """the study folder: results.jsonl, table.md, plot.png, and one folder per cell"""
    nproc_per_node: int = 1
    """processes per run: more than 1 launches each run with torchrun (one per GPU)"""
    keep_models: bool = False
    """keep every cell's trained model (by default only its metrics, args.json and log are kept)"""


def check(args: StudyArgs, train_flags: list[str]) -> None:
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise InputError(f"unknown method {', '.join(unknown)}; pick from {', '.join(METHODS)}")
    bad = [p for p in args.flip_fracs if not 0 <= p < 1]
    if bad:
        raise InputError(f"--flip_fracs {bad[0]} is outside [0, 1)")
    if not (args.methods and args.flip_fracs and args.seeds):
        raise InputError("--methods, --flip_fracs and --seeds each need at least one value")
    for flag in train_flags:
        if flag.split("=")[0] in SET_BY_STUDY:
            raise InputError(f"{flag.split('=')[0]} after -- is set by the study; use the study's own flag")


def cell_name(method: str, flip_frac: float, seed: int) -> str:
    return f"{method}/p{flip_frac:g}_seed{seed}"


class CellFailed(Exception):
    """A training run of the grid failed; the study records it and goes on."""


def run_cell(args: StudyArgs, train_flags: list[str], method: str, flip_frac: float, seed: int) -> dict:
    """Train one cell in its own process (output in the cell's train.log) and return its result line."""
    cell_dir = Path(args.output_dir) / cell_name(method, flip_frac, seed)
    # A run that started (args.json) resumes whatever a kill left: a checkpoint, a checkpoint.old, or nothing yet.
    resume = ["--resume"] if (cell_dir / "args.json").is_file() else []
    launcher = [sys.executable]
    if args.nproc_per_node > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"]
    command = launcher + [str(REPO_DIR / f"{method}.py"), "--model", args.model, "--data", args.data]
    command += ["--flip_frac", str(flip_frac), "--seed", str(seed), "--output_dir", str(cell_dir)]
    command += resume + train_flags
    cell_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (cell_dir / "train.log").open("a") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode == 0
    if not finished:
        tail = (cell_dir / "train.log").read_text().strip().splitlines()[-3:]
        raise CellFailed(
            f"{cell_name(method, flip_frac, seed)} failed; its log {cell_dir / 'train.log'} ends:\n" + "\n".join(tail)
        )
    records = [json.loads(line) for line in (cell_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "eval/reward_accuracy" in r]
    if not evaluated:
        raise CellFailed(
            f"{cell_name(method, flip_frac, seed)} measured no held-out reward accuracy: give it held-out pairs"
        )
    if not args.keep_models:
        for path in cell_dir.iterdir():
            if path.name not in KEPT_FILES:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    run = json.loads((cell_dir / "args.json").read_text())
    last = evaluated[-1]
    result = {
        "method": method,
        "flip_frac": flip_frac,
        "seed": seed,
        "accuracy": last["eval/reward_accuracy"],  # by the method's own reward
        "start_accuracy": evaluated[0]["eval/reward_accuracy"] if evaluated[0]["step"] == 0 else None,
        "log_ratio_accuracy": last.get("eval/log_ratio_accuracy"),
        "avg_logp_accuracy": last.get("eval/avg_logp_accuracy"),
        "reply_score": run.get("reply_score"),  # the tiny task only
        "chosen_logp_change": last.get("eval/logp_per_token_change/chosen"),
        "rejected_logp_change": last.get("eval/logp_per_token_change/rejected"),
        "flipped": run["train_rows"].get("flipped", 0),
        "seconds": round(time.perf_counter() - started, 1),
    }
    steps = [r for r in records if "gamma_i/min" in r]
    if steps:  # gammapo.py: the spread of its per-pair margins over the run
        result["gamma_i"] = {
            "min": min(r["gamma_i/min"] for r in steps),
            "mean": statistics.mean(r["gamma_i/mean"] for r in steps),
            "max": max(r["gamma_i/max"] for r in steps),
            "max_over_min": statistics.mean(r["gamma_i/max"] / r["gamma_i/min"] for r in steps),
        }
    return result


# Two-sided 95% Student t quantiles t_{0.975}(df) for df = 1..30; above that the normal's 1.96 (under 4% narrow).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T_975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95% t interval over seeds); no interval from one seed."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    t = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def summarize(results: list[dict], metric: str) -> dict[tuple[str, float], list[float]]:
    """(method, p) -> the metric's values over seeds (cells that did not measure it left out)."""
    cells = {}
    for r in results:
        if r.get(metric) is not None:
            cells.setdefault((r["method"], r["flip_frac"]), []).append(r[metric])
    return cells


def separated(cells: dict, methods: tuple[str, ...], p: float) -> tuple[float, float] | None:
    """At p: (gap between the best and the worst method's mean, widest 95% interval), when every method has one."""
    spans = [interval(cells[m, p]) for m in methods if (m, p) in cells]
    if len(spans) < 2 or len(spans) < len(methods) or any(half is None for _, half in spans):
        return None
    means = [mean for mean, _ in spans]
    return max(means) - min(means), max(2 * half for _, half in spans)


def metric_table(results: list[dict], args: StudyArgs, metric: str) -> list[str]:
    """One row per method, one column per p: mean ± half-width of the 95% interval over seeds; then where the
    methods are told apart: every interval narrower than the gap between the best and the worst mean."""
    cells = summarize(results, metric)
    lines = [f"**{METRICS[metric]}**", "", "| method | " + " | ".join(f"p = {p:g}" for p in args.flip_fracs) + " |"]
    lines.append("|---|" + "---:|" * len(args.flip_fracs))
    for method in args.methods:
        row = []
        for p in args.flip_fracs:
            mean, half = interval(cells[method, p]) if (method, p) in cells else (None, None)
            row.append("" if mean is None else f"{mean:.3f}" + (f" ± {half:.3f}" if half is not None else ""))
        lines.append(f"| `{method}.py` | " + " | ".join(row) + " |")
    verdicts = []
    for p in args.flip_fracs:
        split = separated(cells, args.methods, p)
        if split is not None:
            gap, widest = split
            verdicts.append(
                f"p = {p:g}: {'yes' if widest < gap else 'no'} (gap {gap:.3f}, widest interval {widest:.3f})"
            )
    if verdicts:
        lines += ["", "Methods told apart (widest interval narrower than best − worst): " + "; ".join(verdicts) + "."]
    return lines + [""]


def gamma_table(results: list[dict], args: StudyArgs) -> list[str]:
    """gammaPO's per-pair margins γ_i over a run, mean over seeds, per p."""
    rows = [r for r in results if r.get("gamma_i")]
    if not rows:
        return []
    lines = ["**gammaPO's margins γ_i over the run** (mean over seeds)", ""]
    lines += [
        "| p | smallest γ_i | mean γ_i | largest γ_i | largest / smallest per step |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in args.flip_fracs:
        spreads = [r["gamma_i"] for r in rows if r["flip_frac"] == p]
        if spreads:
            mean = {k: statistics.mean(s[k] for s in spreads) for k in ("min", "mean", "max", "max_over_min")}
            lines.append(
                f"| {p:g} | {mean['min']:.3f} | {mean['mean']:.3f} | {mean['max']:.3f} | {mean['max_over_min']:.2f} |"
            )
    return lines + [""]


def write_table(path: Path, results: list[dict], args: StudyArgs, train_flags: list[str]) -> str:
    """Markdown: one table per metric (METRICS), then gammaPO's margins."""
    flags = f" {' '.join(train_flags)}" if train_flags else ""
    seeds = ", ".join(str(s) for s in args.seeds)
    caption = (
        f"Held-out metrics after training with a fraction p of the training labels swapped, mean ± half-width of "
        f"the 95% t interval over seeds {seeds}; `--model {args.model} --data {args.data}{flags}`, "
        f"{len(results)} runs."
    )
    lines = [caption, ""]
    for metric in METRICS:
        if summarize(results, metric):
            lines += metric_table(results, args, metric)
    text = "\n".join(lines + gamma_table(results, args))
    path.write_text(text)
    return text


def plot(path: Path, results: list[dict], args: StudyArgs):
    """One panel per metric against p: a point per method (mean over seeds) with its 95% interval, methods drawn
    side by side around each p so that their intervals do not hide one another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if summarize(results, m)]
    if not metrics:  # no cell finished yet
        return None
    step = min((b - a for a, b in zip(sorted(args.flip_fracs), sorted(args.flip_fracs)[1:])), default=0.1)
    n_cols = min(3, len(metrics))
    n_rows = -(-len(metrics) // n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.6 * n_rows), dpi=110, squeeze=False)
    for panel, metric in zip(axes.flat, metrics):
        cells = summarize(results, metric)
        for k, method in enumerate(args.methods):
            ps = [p for p in args.flip_fracs if (method, p) in cells]
            if not ps:
                continue
            spans = [interval(cells[method, p]) for p in ps]
            offset = (k - (len(args.methods) - 1) / 2) * step * 0.6 / len(args.methods)
            panel.errorbar(
                [p + offset for p in ps],
                [mean for mean, _ in spans],
                yerr=[half or 0 for _, half in spans],
                marker="o",
                markersize=3,
                capsize=2,
                linewidth=1,
                label=method,
            )
        if metric in ("log_ratio_accuracy", "avg_logp_accuracy", "reply_score"):
            panel.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # chance / ignores the request
        else:
            panel.axhline(0, color="grey", linestyle=":", linewidth=1)  # no change since step 0
        panel.set_title(METRICS[metric], fontsize=9)
        panel.set_xlabel("fraction of training labels flipped (p)", fontsize=8)
        panel.set_xticks(list(args.flip_fracs))
        panel.grid(alpha=0.3)
        panel.set_xlim(min(args.flip_fracs) - step / 2, max(args.flip_fracs) + step / 2)
    spare = list(axes.flat)[len(metrics) :]
    for panel in spare:
        panel.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:  # the legend in the first empty panel, else in the figure's top right corner
        spare[0].legend(handles, labels, loc="center", ncol=2, fontsize=9, title="method")
    else:
        figure.legend(handles, labels, loc="upper right", ncol=4, fontsize=8)
    seeds = ", ".join(map(str, args.seeds))
    figure.suptitle(f"--model {args.model} --data {args.data}: mean and 95% interval over seeds {seeds}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return figure


def load_results(folder: Path, settings: dict) -> list[dict]:
    """Finished cells of an earlier run of the same study; a folder holding another study is an error."""
    settings_file = folder / "study.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise InputError(
            f"{folder} holds a study with other settings ({settings_file}); pick another --output_dir "
            "or run it with the same --model, --data and flags after --"
        )
    folder.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    results_file = folder / "results.jsonl"
    return [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []


def study(args: StudyArgs, train_flags: list[str]) -> list[dict]:
    check(args, train_flags)
    folder = Path(args.output_dir)
    results = load_results(folder, {"model": args.model, "data": args.data, "train_flags": train_flags})
    grid = [(m, p, s) for m in args.methods for p in args.flip_fracs for s in args.seeds]
    in_grid = set(grid)
    wanted = [r for r in results if (r["method"], r["flip_frac"], r["seed"]) in in_grid]  # this grid's cells
    done = {(r["method"], r["flip_frac"], r["seed"]) for r in wanted}
    todo = [cell for cell in grid if cell not in done]
    failures = []
    (folder / "failures.jsonl").unlink(missing_ok=True)  # this command's failures; a rerun tries those cells again
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="robustness", unit="run", dynamic_ncols=True)
    for method, flip_frac, seed in todo:
        bar.set_postfix_str(cell_name(method, flip_frac, seed))
        try:
            result = run_cell(args, train_flags, method, flip_frac, seed)
        except CellFailed as e:
            failures.append(str(e))
            with (folder / "failures.jsonl").open("a") as f:
                f.write(json.dumps({"method": method, "flip_frac": flip_frac, "seed": seed, "error": str(e)}) + "\n")
            bar.update()
            continue
        wanted.append(result)
        with (folder / "results.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        write_table(folder / "table.md", wanted, args, train_flags)
        plot(folder / "plot.png", wanted, args)
        bar.update()
    bar.close()
    print(write_table(folder / "table.md", wanted, args, train_flags))
    plot(folder / "plot.png", wanted, args)
    print(f"table: {folder / 'table.md'}, plot: {folder / 'plot.png'}")
    if failures:
        listed = folder / "failures.jsonl"
        raise CellFailed(f"{len(failures)} of {len(todo)} runs failed (listed in {listed}); the first: {failures[0]}")
    return wanted


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = tyro.cli(StudyArgs, args=argv[:split], use_underscores=True, description=__doc__)
    try:
        study(args, argv[split + 1 :])
    except InputError as e:
        print(f"robustness: error: {e}", file=sys.stderr)
        sys.exit(2)
    except CellFailed as e:
        print(f"robustness: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
