"""Label-noise robustness: every method over a grid of flipped-label fractions p and seeds, in one command.

Each cell trains one method with `--flip_frac p --seed s` (chosen and rejected swapped in a seeded fraction p
of the training pairs, never in the held-out ones) and records its final held-out reward accuracy. The study
folder gets `results.jsonl` (one line per finished cell), `table.md` (mean ± std over seeds) and `plot.png`
(accuracy against p, one line per method, a bar spans the seeds), all rewritten after every cell.
Running the same command again skips finished cells; an interrupted cell resumes from its checkpoint. A cell
that fails is recorded in `failures.jsonl` with the end of its log, the others still run, and the command then
exits with status 1.

    python robustness.py                                     # 8 methods x 5 p x 3 seeds on the tiny task (CPU)
    python robustness.py --methods dpo simpo --seeds 1       # a subset
    python robustness.py -- --select_frac 0.5                # flags after -- go to every training run
    python robustness.py --model Qwen/Qwen2.5-0.5B-Instruct --data HuggingFaceH4/ultrafeedback_binarized \\
        --nproc_per_node 8 --output_dir study/qwen -- --max_train_samples 20000
"""

import json
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
KEPT_FILES = ("metrics.jsonl", "args.json", "train.log")  # a cell's model weights go unless --keep_models


@dataclass
class StudyArgs:
    methods: tuple[str, ...] = METHODS
    """method files to train (without .py)"""
    flip_fracs: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)
    """fractions p of training labels swapped, each in [0, 1)"""
    seeds: tuple[int, ...] = (1, 2, 3)
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
    return {
        "method": method,
        "flip_frac": flip_frac,
        "seed": seed,
        "accuracy": evaluated[-1]["eval/reward_accuracy"],
        "start_accuracy": evaluated[0]["eval/reward_accuracy"] if evaluated[0]["step"] == 0 else None,
        "flipped": json.loads((cell_dir / "args.json").read_text())["train_rows"].get("flipped", 0),
        "seconds": round(time.perf_counter() - started, 1),
    }


def summarize(results: list[dict]) -> dict[tuple[str, float], list[float]]:
    """(method, p) -> the accuracies over seeds."""
    cells = {}
    for r in results:
        cells.setdefault((r["method"], r["flip_frac"]), []).append(r["accuracy"])
    return cells


def write_table(path: Path, results: list[dict], args: StudyArgs, train_flags: list[str]) -> str:
    """Markdown: one row per method, one column per p, mean ± std of held-out reward accuracy over seeds."""
    cells = summarize(results)
    header = "| method | " + " | ".join(f"p = {p:g}" for p in args.flip_fracs) + " |"
    lines = [header, "|---|" + "---:|" * len(args.flip_fracs)]
    for method in args.methods:
        row = []
        for p in args.flip_fracs:
            accs = cells.get((method, p), [])
            spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            row.append(f"{statistics.mean(accs):.3f}{spread}" if accs else "")
        lines.append(f"| `{method}.py` | " + " | ".join(row) + " |")
    flags = f" {' '.join(train_flags)}" if train_flags else ""
    seeds = ", ".join(str(s) for s in args.seeds)
    caption = (
        f"Held-out reward accuracy (mean ± std over seeds {seeds}) after training with a fraction p of the training "
        f"labels swapped; `--model {args.model} --data {args.data}{flags}`, {len(results)} runs."
    )
    text = caption + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(path: Path, results: list[dict], args: StudyArgs):
    """Accuracy against p: one line per method (mean over seeds), a bar from the lowest to the highest seed.
    Methods are drawn side by side around each p so that their bars do not hide one another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summarize(results)
    step = min((b - a for a, b in zip(sorted(args.flip_fracs), sorted(args.flip_fracs)[1:])), default=0.1)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for k, method in enumerate(args.methods):
        ps = [p for p in args.flip_fracs if (method, p) in cells]
        if not ps:
            continue
        accs = [cells[method, p] for p in ps]
        means = [statistics.mean(a) for a in accs]
        spread = [[m - min(a) for m, a in zip(means, accs)], [max(a) - m for m, a in zip(means, accs)]]
        offset = (k - (len(args.methods) - 1) / 2) * step * 0.5 / len(args.methods)
        axes.errorbar([p + offset for p in ps], means, yerr=spread, marker="o", markersize=4, capsize=2, label=method)
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes.annotate("chance", (min(args.flip_fracs), 0.5), textcoords="offset points", xytext=(0, 3), color="grey")
    axes.set_xlabel("fraction of training labels flipped (p)")
    axes.set_ylabel("held-out reward accuracy (mean, bar: min-max over seeds)")
    axes.set_title(f"Label noise: --model {args.model} --data {args.data}, seeds {', '.join(map(str, args.seeds))}")
    axes.set_xticks(list(args.flip_fracs))
    axes.legend(fontsize=8, ncol=2, loc="center left")
    axes.grid(alpha=0.3)
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
