"""One GPU check: what minpo has not yet run on a GPU, in one command that prints one markdown table.

    python bench/gpu_check.py --output gpu_check.md    # one GPU, under 8 minutes; also gpu_check.json and .log
    python bench/gpu_check.py --dry_run               # the same steps at tiny sizes: under a minute on 2 CPU cores
    python bench/gpu_check.py --only train adamw      # some steps again (model is built for the steps that need it)

Each row runs in its own process with a time limit, so a failing step is a row and the others still run
(check | result | numbers | seconds). In the order they run:
- environment: GPU, its memory, torch / CUDA / transformers versions, a bf16 8192^3 matmul's TFLOP/s, and which of
  tyro, trl, vllm, datasets import (every minpo script needs tyro).
- CUDA tests: `pytest tests/test_cuda.py` (bf16 training learns, batch_logps on CUDA agrees with CPU, the saved
  folder is bf16 and loads), counted passed / failed / skipped.
- model and pairs: a random-weight Qwen2.5-0.5B-shaped folder (bench/configs/Qwen2.5-0.5B-Instruct/config.json,
  saved in bf16 with common.build_tiny_tokenizer()'s byte-level ChatML tokenizer, so no hub is needed) and a .jsonl of
  pairs whose prompt and replies are 1024 tokens each (2048 per sequence), lengths checked with the tokenizer.
- train: `python dpo.py` and `python gammapo.py` on them as a user runs them (--precision bf16, micro-batch 2,
  global batch 16, 6 steps, --max_length 2048 --max_prompt_length 1024), gradient checkpointing on and off:
  tokens/s from metrics.jsonl with the first step left out, MFU, peak GB against bench/memory_budget.py's budget,
  and the saved folder's dtype. The DPO run with checkpointing also writes a resumable checkpoint (--save_steps 3).
- AdamW: optimizer.step() on the same model's parameters sharded by common.shard_model (FSDP2 fully_shard, one
  GPU, gradients from one real backward), fused=True (minpo's choice on CUDA) against foreach=True (torch's default).
- eval: `python eval.py FOLDER --limit 16 --judge none --max_new_tokens 256` on the DPO run's folder, with vLLM if
  it imports, else transformers (`--backend hf`), against a synthetic 16-row reference file (no hub there).
- vs TRL: `python bench/vs_trl.py --config gpu` if trl imports, else a skipped row.

MFU = tokens/s x 6N / peak, N = non-embedding parameters + LM head (bench/vs_trl.py's flops_params; PEAK_TFLOPS
gives 989 for H100 and H200, dense bf16). With checkpointing the recomputed forward is not counted.

No step starts after --budget_s (470 s; 150 with --dry_run) and each one's time limit ends there, so the whole check
stays under 8 minutes; a step left out for time reads "not run". Exit code 0 when every chosen step ran and none
failed; "skipped" rows (nothing to check here: no CUDA, no trl) are fine.

--dry_run (CI runs it on CPU): common's tiny model in a folder, 128-token pairs, 2 steps, 4 answers with
transformers, `vs_trl.py --help`; what needs CUDA reads "skipped: no CUDA" (AdamW is still timed on CPU to run the
code). Two steps run at a time there; on a GPU one at a time, so each timing and peak is its own.

The GPU machine lacks tyro (and trl and datasets for the TRL row): bench/gpu_wheels.sh downloads the wheels and
prints the one command line that installs them there and runs this check.
"""

import argparse
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_DIR / "bench"
QWEN_05B_CONFIG = BENCH_DIR / "configs" / "Qwen2.5-0.5B-Instruct"
OPTIONAL_PACKAGES = ("tyro", "trl", "vllm", "datasets")
LOG_TAIL = 20_000  # characters of each command's stdout and stderr kept in the log


@dataclass(frozen=True)
class Sizes:
    """The work of one check: the GPU sizes, or tiny ones for --dry_run."""

    model: str  # "qwen2.5-0.5b" (random weights, the shipped config) or "tiny" (common.build_tiny_model)
    prompt_tokens: int  # every prompt, chat template included
    reply_tokens: int  # every chosen and rejected reply, end-of-turn tokens included
    micro_batch: int
    global_batch: int
    steps: int  # optimizer steps per training run
    save_steps: int  # the DPO run with checkpointing writes a checkpoint at this step
    held_out: int  # held-out pairs
    adamw_steps: int  # timed optimizer steps per AdamW variant and round
    eval_limit: int
    max_new_tokens: int
    vs_trl: tuple[str, ...]  # bench/vs_trl.py's arguments

    @property
    def max_length(self) -> int:
        return self.prompt_tokens + self.reply_tokens


GPU_SIZES = Sizes("qwen2.5-0.5b", 1024, 1024, 2, 16, 6, 3, 4, 20, 16, 256, ("--config", "gpu"))
DRY_SIZES = Sizes("tiny", 64, 64, 2, 4, 2, 1, 4, 3, 4, 8, ("--help",))
TRAIN_RUNS = [(method, gc) for method in ("dpo", "gammapo") for gc in (True, False)]
STEPS = ("env", "tests", "model", "train", "adamw", "eval", "vs_trl")  # the order they run in
NEEDS_MODEL = {"train", "adamw", "eval"}


class StepFailed(Exception):
    """A step did not do its work: the row reads 'failed: <message>'."""


@dataclass
class Outcome:
    result: str  # "ok", "ok (...)", "skipped: ..." (nothing to check here), "failed: ..." or "not run: ..."
    numbers: str = ""
    details: dict = field(default_factory=dict)


def last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")


def fmt(value: float) -> str:
    """Thousands with a separator, small numbers with 3 significant digits."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# ---- the run: settings, rows, log, subprocesses ----


class Check:
    """One invocation: its sizes, work folder, time budget, rows, and the files they are written to."""

    def __init__(self, args: argparse.Namespace, cuda: bool):
        self.args, self.cuda = args, cuda
        self.sizes = DRY_SIZES if args.dry_run else GPU_SIZES
        self.work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.output = Path(args.output)
        self.deadline = time.monotonic() + args.budget_s
        self.rows: list[dict] = []
        self.env: dict = {}  # what the environment worker found
        self.model: dict = {}  # what the model worker built
        self.trained_folder: Path | None = None
        self.started = datetime.now()
        # On a GPU one step at a time: each timing and peak is its own. The dry run's work is tiny (mostly process
        # start-up), so there two steps share the 2 CPU cores, one thread each.
        self.parallel = 2 if args.dry_run else 1
        self.lock = threading.Lock()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.output.with_suffix(".log")
        self.log_path.write_text(f"gpu_check {self.started:%Y-%m-%d %H:%M:%S}: {' '.join(sys.argv)}\n")

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        with self.lock, self.log_path.open("a") as f:
            f.write(text + "\n")

    def call(self, name: str, command: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        """A command from the repository root, as a user would type it, with the hub offline and no progress bars.
        Its own process group, so a timeout also ends what it started (vs_trl's workers, vLLM's engine). Output goes
        to the log; a non-zero exit (when check) or a timeout fails the step with its last line."""
        if self.time_left() < 5:
            raise StepFailed("no time left in --budget_s")
        timeout = min(timeout, self.time_left())
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env |= {"PYTHONUNBUFFERED": "1"} | ({"OMP_NUM_THREADS": "1"} if self.parallel > 1 else {})
        started = time.monotonic()
        pipes = dict(text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process = subprocess.Popen(command, cwd=REPO_DIR, env=env, start_new_session=True, **pipes)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            self.log_call(name, command, f"killed after {timeout:.0f} s", stdout, stderr, started)
            raise StepFailed(
                f"timed out after {timeout:.0f} s (last output: {last_line(stderr or stdout)[:150]})"
            ) from None
        self.log_call(name, command, f"exit {process.returncode}", stdout, stderr, started)
        done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        if check and done.returncode:
            raise StepFailed(f"exit {done.returncode}: {last_line(stderr or stdout)[:200]}")
        return done

    def log_call(self, name, command, how, stdout, stderr, started) -> None:
        head = f"\n=== {name}: {' '.join(map(str, command))}\n=== {how}, {time.monotonic() - started:.1f} s\n"
        self.log(head + f"--- stdout\n{stdout[-LOG_TAIL:]}\n--- stderr\n{stderr[-LOG_TAIL:]}")

    def worker(self, name: str, timeout: float) -> dict:
        """This file's --worker NAME in a fresh process (its own CUDA context and peak memory): its JSON result."""
        command = [sys.executable, __file__, "--worker", name, "--work_dir", str(self.work_dir)]
        command += ["--dry_run"] if self.args.dry_run else []
        done = self.call(f"worker {name}", command, timeout)
        try:
            return json.loads(last_line(done.stdout))
        except json.JSONDecodeError:
            raise StepFailed(f"worker {name} printed no result: {last_line(done.stdout)[:150]}") from None

    def run_step(self, check: str, step: Callable[[], "Outcome"], min_s: float = 10) -> dict:
        """One step, whatever it raises, as a row."""
        started = time.monotonic()
        if self.time_left() < min_s:
            outcome = Outcome(f"not run: --budget_s {self.args.budget_s:g} spent ({self.time_left():.0f} s left)")
        else:
            try:
                outcome = step()
            except StepFailed as e:
                outcome = Outcome(f"failed: {e}")
            except Exception as e:  # a bug here must not cost the rows after it
                outcome = Outcome(f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
        row = dict(check=check, result=outcome.result, numbers=outcome.numbers, seconds=time.monotonic() - started)
        print(f"[gpu_check] {check}: {outcome.result} ({row['seconds']:.1f} s) {outcome.numbers}", flush=True)
        return row | {"details": outcome.details}

    def run_steps(self, steps: list[tuple]) -> None:
        """Steps that do not depend on each other, (check, step, min_s) each; rows in this order, and the output
        files rewritten after each, so a killed run keeps its rows so far."""
        with ThreadPoolExecutor(self.parallel) as pool:
            for row in pool.map(lambda args: self.run_step(*args), steps):
                self.rows.append(row)
                self.write()

    def failed(self) -> bool:
        """Whether a step failed or never ran: the exit code is 0 only when every chosen step ran."""
        return any(row["result"].startswith(("failed", "not run")) for row in self.rows)

    def title(self) -> str:
        env = self.env
        device = f"{env['gpu']} ({env['gpu_memory_gb']:.1f} GiB)" if env.get("gpu") else "no CUDA"
        versions = f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}"
        mode = "--dry_run (tiny sizes)" if self.args.dry_run else "Qwen2.5-0.5B shape, 2048 tokens"
        return f"gpu_check, {self.started:%Y-%m-%d %H:%M}, {device}, {versions}, {mode}"

    def table(self) -> str:
        lines = [f"{self.title()}\n", "| check | result | numbers | seconds |", "|---|---|---|---:|"]
        for row in self.rows:
            cells = [row["check"], row["result"], row["numbers"]]
            cells = [str(cell).replace("|", "/").replace("\n", " ") for cell in cells]
            lines.append(f"| {' | '.join(cells)} | {row['seconds']:.1f} |")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.output.write_text(self.table())
        record = dict(title=self.title(), command=sys.argv, dry_run=self.args.dry_run, rows=self.rows)
        self.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


# ---- steps (in this process: each starts commands and reads what they wrote) ----


def step_env(check: Check) -> Outcome:
    env = check.env = check.worker("env", 180)
    packages = ", ".join(f"{name} {env['packages'][name]}" for name in OPTIONAL_PACKAGES)
    if env.get("gpu"):
        numbers = (
            f"{env['gpu']}, {env['gpu_memory_gb']:.1f} GiB, CUDA {env['cuda']}, driver {env['driver']}; "
            f"bf16 8192^3 matmul {env.get('matmul_tflops', float('nan')):.0f} TFLOP/s; "
        )
    else:
        numbers = "no CUDA; "
    numbers += f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}; {packages}"
    if not env["packages"]["tyro"][0].isdigit():
        raise StepFailed(f"tyro does not import ({env['packages']['tyro']}): every minpo script needs it. {numbers}")
    return Outcome("ok", numbers, env)


def step_tests(check: Check) -> Outcome:
    report = check.work_dir / "test_cuda.xml"
    command = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    done = check.call("pytest", command + [f"--junitxml={report}"], 360, check=False)
    if not report.is_file():
        raise StepFailed(f"pytest wrote no report (exit {done.returncode}): {last_line(done.stdout)[:150]}")
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    bad = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    bad += [case.get("name") for case in suite.iter("testcase") if case.find("error") is not None]
    numbers = f"{passed} passed, {failed} failed, {counts['skipped']} skipped" + (f" ({', '.join(bad)})" if bad else "")
    details = counts | {"failed_tests": bad}
    if failed or done.returncode not in (0, 1) or counts["tests"] == 0:
        return Outcome(f"failed: {failed} of {counts['tests']} tests failed (exit {done.returncode})", numbers, details)
    if not check.cuda:
        return Outcome("skipped: no CUDA", f"pytest ran: {numbers}", details)
    return Outcome("ok" if passed else "failed: nothing ran", numbers, details)


def step_model(check: Check) -> Outcome:
    model = check.model = check.worker("model", 240)
    numbers = (
        f"{model['name']}: {model['params'] / 1e6:.1f}M parameters (N = {model['flops_params'] / 1e6:.1f}M for MFU); "
        f"{model['train_pairs']} + {model['held_out_pairs']} pairs of {model['prompt_tokens']} prompt + "
        f"{model['reply_tokens']} reply tokens (checked with the tokenizer)"
    )
    return Outcome("ok", numbers, model)


def train_command(check: Check, method: str, gradient_checkpointing: bool, output_dir: Path) -> list[str]:
    s, model = check.sizes, check.model
    command = [sys.executable, f"{method}.py", "--model", model["folder"], "--data", model["train_file"]]
    command += ["--test_data", model["test_file"], "--output_dir", str(output_dir)]
    command += ["--max_length", str(s.max_length), "--max_prompt_length", str(s.prompt_tokens)]
    command += ["--micro_batch_size", str(s.micro_batch), "--global_batch_size", str(s.global_batch)]
    command += ["--num_epochs", "1", "--precision", "bf16", "--ref_cache_dir", str(check.work_dir / "ref_cache")]
    command += ["--gradient_checkpointing" if gradient_checkpointing else "--no_gradient_checkpointing"]
    saves = method == "dpo" and gradient_checkpointing  # one run writes a resumable checkpoint mid-way
    return command + ["--save_steps", str(s.save_steps if saves else 0)]


def read_training_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise StepFailed(f"no {path}")
    return [row for row in map(json.loads, path.read_text().splitlines()) if "tokens/s" in row]


def safetensors_dtypes(folder: Path) -> set[str]:
    """The dtypes in a folder's safetensors headers (8-byte length, then JSON), without loading a tensor."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        dtypes |= {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    return dtypes


def mfu(check: Check, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation of a training run (6N per token), None without a GPU or a known peak."""
    peak = check.args.peak_tflops or check.env.get("peak_tflops")
    return tokens_per_s * 6 * check.model["flops_params"] / (peak * 1e12) if check.cuda and peak else None


def step_train(check: Check, method: str, gradient_checkpointing: bool) -> Outcome:
    if not check.model:
        raise StepFailed("no model folder (see the model row)")
    output_dir = check.work_dir / "runs" / f"{method}-{'gc' if gradient_checkpointing else 'nogc'}"
    command = train_command(check, method, gradient_checkpointing, output_dir)
    started = time.monotonic()
    check.call(f"{method}.py", command, 240)
    seconds = time.monotonic() - started
    steps = read_training_metrics(output_dir)
    if len(steps) != check.sizes.steps:
        raise StepFailed(f"{len(steps)} training steps in metrics.jsonl, {check.sizes.steps} expected")
    timed = steps[1:]  # the first step also pays for CUDA's and the allocator's warm-up
    tokens_per_s = len(timed) / sum(1 / row["tokens/s"] for row in timed)  # every step has the same tokens
    peak_gb = max(row["peak_memory_gb"] for row in steps)
    utilisation = mfu(check, tokens_per_s)
    budget = check.model.get("budget_gb", {}).get("on" if gradient_checkpointing else "off")
    dtypes = safetensors_dtypes(output_dir)
    numbers = f"{fmt(tokens_per_s)} tokens/s ({f'steps 2-{len(steps)}' if len(timed) > 1 else 'step 2'})"
    numbers += f", MFU {100 * utilisation:.1f}%" if utilisation is not None else ", MFU – (no GPU)"
    memory = "peak GPU memory" if check.cuda else "peak RSS"
    numbers += f", {memory} {peak_gb:.2f} GB" + (f" (budget {budget:.2f})" if budget and check.cuda else "")
    config_dtype = json.loads((output_dir / "config.json").read_text()).get("dtype")
    saved = "/".join(sorted(dtypes)) or "no weights"
    numbers += f", saved {saved} (config.json: {config_dtype}), whole run {seconds:.0f} s"
    details = dict(tokens_per_s=tokens_per_s, mfu=utilisation, peak_gb=peak_gb, budget_gb=budget, dtypes=sorted(dtypes))
    details |= dict(config_dtype=config_dtype, command=command, steps=steps)
    if dtypes != {"BF16"}:
        return Outcome(f"failed: saved {saved}, not bf16 weights", numbers, details)
    if method == "dpo" and gradient_checkpointing:
        check.trained_folder = output_dir
    # A config that names another dtype than the weights makes from_pretrained(dtype="auto") load them in that one:
    # worth a look, not a failed training run.
    result = "ok" if config_dtype == "bfloat16" else f"ok, but config.json says {config_dtype} for bf16 weights"
    return Outcome(result, numbers, details)


def step_adamw(check: Check) -> Outcome:
    if not check.model:
        raise StepFailed("no model folder (see the model row)")
    result = check.worker("adamw", 240)
    fused, foreach = result["fused_ms"], result["foreach_ms"]
    faster = "fused" if fused < foreach else "foreach"
    ratio = max(fused, foreach) / min(fused, foreach)
    numbers = (
        f"fused {fused:.2f} ms, foreach {foreach:.2f} ms per step: {faster} {ratio:.2f}x faster; "
        f"{result['tensors']} tensors, {result['numel'] / 1e6:.1f}M parameters, {result['how']}; "
        f"fused moves {result['fused_tb_s']:.2f} TB/s (7 fp32 reads and writes per parameter)"
    )
    if not check.cuda:
        return Outcome("skipped: no CUDA", f"wired on CPU: {numbers}", result)
    return Outcome("ok", numbers, result)


def synthetic_reference(path: Path, n: int) -> None:
    """Rows shaped like AlpacaEval 2's reference file (dataset, instruction, output, generator)."""
    rows = [
        dict(dataset="gpu_check", instruction=f"Name {i + 2} colours and say one thing about each.", output="Red.")
        for i in range(n)
    ]
    path.write_text(json.dumps([row | {"generator": "reference"} for row in rows], indent=2))


def step_eval(check: Check) -> Outcome:
    if not check.model:
        raise StepFailed("no model folder (see the model row)")
    if check.trained_folder:
        folder, which = check.trained_folder, "the DPO run's folder"
    else:
        folder, which = Path(check.model["folder"]), "the random-weight folder (no DPO run)"
    vllm = check.cuda and check.env.get("packages", {}).get("vllm", "")[:1].isdigit()
    backend = "vllm" if vllm else "hf"
    reference = check.work_dir / "reference.json"
    synthetic_reference(reference, check.sizes.eval_limit)
    command = [sys.executable, "eval.py", str(folder), "--backend", backend, "--limit", str(check.sizes.eval_limit)]
    command += ["--judge", "none", "--reference", str(reference), "--max_new_tokens", str(check.sizes.max_new_tokens)]
    started = time.monotonic()
    check.call("eval.py", command, 300)
    seconds = time.monotonic() - started
    rows = json.loads((folder / "alpaca_eval" / "model_outputs.json").read_text())
    if len(rows) != check.sizes.eval_limit:
        raise StepFailed(f"{len(rows)} answers written, {check.sizes.eval_limit} asked for")
    characters = sum(len(row["output"]) for row in rows)
    numbers = f"{len(rows)} answers ({characters} characters) from {which}, load and generate {seconds:.0f} s"
    numbers += f", --max_new_tokens {check.sizes.max_new_tokens}"
    result = "ok" if vllm else f"ok (--backend hf: {'vllm not available' if check.cuda else 'no CUDA'})"
    return Outcome(result, numbers, dict(backend=backend, answers=len(rows), seconds=seconds, command=command))


def step_vs_trl(check: Check) -> Outcome:
    trl = check.env.get("packages", {}).get("trl", "not checked")
    skipped = None if trl[:1].isdigit() else f"skipped: trl not installed (see bench/gpu_wheels.sh); trl {trl}"
    if skipped or check.args.dry_run:
        check.call("vs_trl.py --help", [sys.executable, "bench/vs_trl.py", "--help"], 60)
        return Outcome(skipped or "ok (--help only)", "`bench/vs_trl.py --help` ran")
    results_file = check.work_dir / "vs_trl.json"
    check.call("vs_trl.py", [sys.executable, "bench/vs_trl.py", *check.sizes.vs_trl, "--json", str(results_file)], 420)
    return vs_trl_summary(json.loads(results_file.read_text())["results"])


def vs_trl_summary(results: dict) -> Outcome:
    """The row for bench/vs_trl.py's --json results: minpo against TRL per method, and any run that failed."""
    failures = [f"{label}: {r['error']}" for label, r in results.items() if "error" in r]
    parts = []
    for method in ("dpo", "simpo"):
        ours, theirs = results.get(f"minpo {method}", {}), results.get(f"trl {method}", {})
        if "tokens_per_s" not in ours or "tokens_per_s" not in theirs:
            continue
        part = f"{method} {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s "
        part += f"({fmt(ours['tokens_per_s'])} / {fmt(theirs['tokens_per_s'])}), "
        part += f"{ours['peak_gb'] / theirs['peak_gb']:.2f}x peak GB ({ours['peak_gb']:.1f} / {theirs['peak_gb']:.1f})"
        if ours.get("mfu") is not None and theirs.get("mfu") is not None:
            part += f", MFU {100 * ours['mfu']:.1f}% / {100 * theirs['mfu']:.1f}%"
        parts.append(part)
    numbers = "minpo / TRL: " + "; ".join(parts) if parts else "no pair of runs finished"
    result = f"failed: {'; '.join(failures)[:200]}" if failures else "ok"
    return Outcome(result, numbers, results)


def run_check(args: argparse.Namespace) -> int:
    import torch

    check = Check(args, cuda=torch.cuda.is_available())
    chosen = set(args.only or STEPS)
    chosen |= {"model"} if chosen & NEEDS_MODEL else set()
    print(f"[gpu_check] work folder {check.work_dir}; log {check.log_path}", flush=True)
    first = [("environment", lambda: step_env(check))]  # the steps after it read what it found
    first += [("CUDA tests (pytest tests/test_cuda.py)", lambda: step_tests(check))] if "tests" in chosen else []
    first += [("model and pairs", lambda: step_model(check))] if "model" in chosen else []
    check.run_steps(first)
    second = []  # on the model folder
    for method, gc in TRAIN_RUNS if "train" in chosen else []:
        name = f"train {method}.py, checkpointing {'on' if gc else 'off'}"
        second.append((name, lambda method=method, gc=gc: step_train(check, method, gc), 30))
    second += [("AdamW fused vs foreach", lambda: step_adamw(check), 30)] if "adamw" in chosen else []
    check.run_steps(second)
    last = [("eval.py --limit", lambda: step_eval(check), 30)] if "eval" in chosen else []  # on a trained folder
    vs_trl_min_s = 20 if args.dry_run else 120  # its four GPU runs take minutes: not started on less
    last += [("bench/vs_trl.py", lambda: step_vs_trl(check), vs_trl_min_s)] if "vs_trl" in chosen else []
    check.run_steps(last)
    print("\n" + check.table(), flush=True)
    print(f"written: {check.output}, {check.output.with_suffix('.json')}, {check.log_path}")
    if not args.keep:
        shutil.rmtree(check.work_dir, ignore_errors=True)
    return 1 if check.failed() else 0


# ---- workers (each in its own process, started by a step above; the last line of stdout is the JSON result) ----


def worker_env(sizes: Sizes, work_dir: Path) -> dict:
    import importlib
    import importlib.metadata
    import platform

    import torch
    import transformers

    sys.path.insert(0, str(BENCH_DIR))
    from vs_trl import PEAK_TFLOPS

    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__)
    info["packages"] = {}
    for name in OPTIONAL_PACKAGES:
        try:
            importlib.import_module(name)
            info["packages"][name] = importlib.metadata.version(name)
        except ImportError as e:
            info["packages"][name] = "missing" if e.name == name else f"fails ({last_line(str(e))[:80]})"
        except Exception as e:  # an installed package that breaks on import says so, in one cell
            info["packages"][name] = f"fails ({type(e).__name__}: {last_line(str(e))[:80]})"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info |= dict(gpu=properties.name, gpu_memory_gb=properties.total_memory / 2**30, cuda=torch.version.cuda)
        info["driver"] = nvidia_driver()
        info["peak_tflops"] = next((v for k, v in PEAK_TFLOPS.items() if k in properties.name), None)
        try:
            info["matmul_tflops"] = matmul_tflops()
        except Exception as e:  # the row still shows the rest
            info["matmul_error"] = f"{type(e).__name__}: {last_line(str(e))[:100]}"
    return info


def nvidia_driver() -> str:
    try:
        command = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """What this GPU's bf16 matrix product reaches, next to the data sheet's peak that MFU divides by."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def text(rng: random.Random, n: int) -> str:
    """n bytes of letters and spaces: n tokens for the byte-level tokenizer."""
    return "x" + "".join(rng.choices(string.ascii_lowercase + " ", k=n - 1))


def write_pairs(path: Path, n: int, prompt_bytes: int, reply_bytes: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            row = dict(prompt=text(rng, prompt_bytes), chosen=text(rng, reply_bytes), rejected=text(rng, reply_bytes))
            f.write(json.dumps(row) + "\n")


def template_overhead(tokenizer) -> tuple[int, int]:
    """Tokens the chat template adds around a prompt and around a reply (with a one-byte text in each)."""
    prompt = [{"role": "user", "content": "x"}]
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "y"}], tokenize=False)
    n_prompt = len(tokenizer(prompt_ids, add_special_tokens=False)["input_ids"])
    n_full = len(tokenizer(full_ids, add_special_tokens=False)["input_ids"])
    return n_prompt - 1, n_full - n_prompt - 1


def build_model(sizes: Sizes, folder: Path, tokenizer) -> str:
    """The random-weight model folder, saved in bf16 like a hub checkpoint. Returns its description."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    import common

    if sizes.model == "tiny":
        model, name = common.build_tiny_model(tokenizer, seed=0), "common's tiny Qwen2"
    else:
        config = AutoConfig.from_pretrained(QWEN_05B_CONFIG)
        config.bos_token_id, config.eos_token_id = None, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):  # random init of 0.5B parameters: seconds on a GPU, a minute on few CPU cores
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
        )
        name = "random Qwen2.5-0.5B shape"
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return name


def worker_model(sizes: Sizes, work_dir: Path) -> dict:
    import torch

    import common

    sys.path.insert(0, str(BENCH_DIR))
    import memory_budget
    import vs_trl
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = work_dir / "model"
    tokenizer = common.build_tiny_tokenizer()
    name = build_model(sizes, folder, tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    prompt_extra, reply_extra = template_overhead(tokenizer)
    train_file, test_file = work_dir / "train.jsonl", work_dir / "test.jsonl"
    n_train = sizes.global_batch * sizes.steps
    for path, n, seed in ((train_file, n_train, 1), (test_file, sizes.held_out, 2)):
        write_pairs(path, n, sizes.prompt_tokens - prompt_extra, sizes.reply_tokens - reply_extra, seed)
    check_lengths(tokenizer, train_file, sizes)
    info = dict(name=name, folder=str(folder), train_file=str(train_file), test_file=str(test_file))
    info |= dict(params=sum(p.numel() for p in model.parameters()), flops_params=vs_trl.flops_params(model))
    info |= dict(train_pairs=n_train, held_out_pairs=sizes.held_out)
    info |= dict(prompt_tokens=sizes.prompt_tokens, reply_tokens=sizes.reply_tokens)
    try:  # bench/memory_budget.py's prediction of the peak, for the training rows
        shape = memory_budget.load_shape(str(folder))
        run = dict(world_size=1, pairs=sizes.micro_batch, max_length=sizes.max_length, completion_frac=0.5)
        run |= dict(sync_every_micro_batch=True)  # --gradient_sync micro_batch, the default
        runs = {("on" if gc else "off"): memory_budget.Run(**run, gradient_checkpointing=gc) for gc in (True, False)}
        info["budget_gb"] = {key: memory_budget.total_bytes(shape, run) / 2**30 for key, run in runs.items()}
    except Exception as e:  # the budget is a comparison, not a requirement
        info["budget_error"] = f"{type(e).__name__}: {e}"
    return info


def check_lengths(tokenizer, train_file: Path, sizes: Sizes) -> None:
    """Every pair tokenizes to exactly the asked lengths, untruncated: what the training rows time."""
    import common

    examples = common.parse_rows(common.read_rows(train_file), str(train_file))
    pairs, _ = common.tokenize_pairs(examples, tokenizer, sizes.max_length, sizes.prompt_tokens)
    lengths = {(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs}
    if len(pairs) != len(examples) or lengths != {(sizes.prompt_tokens, sizes.reply_tokens, sizes.reply_tokens)}:
        raise ValueError(f"pairs tokenize to (prompt, chosen, rejected) lengths {sorted(lengths)[:3]}, not the asked")


def worker_adamw(sizes: Sizes, work_dir: Path) -> dict:
    """fused=True against foreach=True on the sharded model's parameters, interleaved twice, the faster round
    of each kept (the first steps create the moments and are not timed)."""
    import torch
    import torch.distributed as dist

    import common

    folder, device_kind = work_dir / "model", "cuda" if torch.cuda.is_available() else "cpu"
    _, _, device = common.setup_distributed()
    args = common.TrainArgs(model=str(folder), precision="bf16", gradient_checkpointing=False)
    tokenizer = common.load_tokenizer(str(folder))
    policy = common.shard_model(common.load_model(str(folder), tokenizer, torch.float32), args, device)
    examples = common.parse_rows(common.read_rows(work_dir / "test.jsonl"), "test.jsonl")
    pairs, _ = common.tokenize_pairs(examples[: sizes.micro_batch], tokenizer, sizes.max_length, sizes.prompt_tokens)
    logps, _ = policy(*(t.to(device) for t in common.collate(pairs, tokenizer.pad_token_id)))
    logps.sum().backward()  # real gradients, sharded as training has them

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    optimizers = {
        "fused": torch.optim.AdamW(policy.parameters(), lr=1e-7, weight_decay=0.0, fused=True),  # as common.py
        "foreach": torch.optim.AdamW(policy.parameters(), lr=1e-7, weight_decay=0.0, foreach=True),
    }
    best = {name: float("inf") for name in optimizers}
    for round_ in range(3):
        for name, optimizer in optimizers.items():
            sync()
            started = time.perf_counter()
            for _ in range(2 if round_ == 0 else sizes.adamw_steps):
                optimizer.step()
            sync()
            if round_:  # round 0 creates the moments and warms up
                best[name] = min(best[name], (time.perf_counter() - started) / sizes.adamw_steps * 1e3)
    params = list(policy.parameters())
    numel = sum(p.numel() for p in params)
    dist.destroy_process_group()
    how = f"FSDP2 fully_shard over 1 {device_kind} process (common.shard_model), fp32 master weights"
    result = dict(fused_ms=best["fused"], foreach_ms=best["foreach"], tensors=len(params), numel=numel, how=how)
    return result | {"fused_tb_s": 7 * 4 * numel / (best["fused"] / 1e3) / 1e12}


WORKERS = {"env": worker_env, "model": worker_model, "adamw": worker_adamw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="tiny sizes, for a CPU (CI runs this)")
    parser.add_argument("--output", default="gpu_check.md", help="the table; the JSON and the log go beside it")
    steps = ", ".join(STEPS)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=STEPS,
        metavar="STEP",
        help=f"only these of {steps} (env always, model when needed)",
    )
    parser.add_argument("--budget_s", type=float, help="stop starting steps after this (default 470, dry run 150)")
    parser.add_argument("--work_dir", help="model folder, pairs and runs go here (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: removed at the end)")
    parser.add_argument("--peak_tflops", type=float, help="the GPU's dense bf16 peak for MFU, if not in PEAK_TFLOPS")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_DIR))
    if args.worker:
        sizes = DRY_SIZES if args.dry_run else GPU_SIZES
        print(json.dumps(WORKERS[args.worker](sizes, Path(args.work_dir))))
        return
    if args.budget_s is None:
        args.budget_s = 150 if args.dry_run else 470
    sys.exit(run_check(args))


if __name__ == "__main__":
    main()
