"""Kill -9 a training run at random instants, resume it each time, and check it ends bit-identical.

One uninterrupted run first; then the same command with `--save_steps 1` (a checkpoint after every step), killed with
SIGKILL and run again with `--resume`, over and over, with no manual step in between, until a run finishes. Every
other kill comes at a random instant after the start; the others 0-200 ms after a checkpoint write begins (a
checkpoint.tmp folder appears), so that they land inside writes, seals and swaps. The final weights must
equal the uninterrupted run's exactly. Reports how many kills landed inside a checkpoint write (a checkpoint.tmp or
*.deleting folder left behind) and the folder states each kill left.

    python bench/kill_loop.py                       # at least 20 kills on the tiny task, dpo.py
    python bench/kill_loop.py --method gammapo --kills 30
"""

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_DIR = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "tiny", "--max_train_samples", "1024", "--max_test_samples", "32", "--num_epochs", "2"]  # 64 steps


def command(method: str, folder: Path, refs: Path, *extra: str) -> list[str]:
    script = str(REPO_DIR / f"{method}.py")
    return [sys.executable, script, *FLAGS, "--output_dir", str(folder), "--ref_cache_dir", str(refs), *extra]


def kill_after(process: subprocess.Popen, delay: float) -> float | None:
    """SIGKILL after delay seconds, unless the run ends first; the delay, or None."""
    try:
        process.wait(timeout=delay)
        return None
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return delay


def kill_during_write(process: subprocess.Popen, folder: Path, rng: random.Random) -> float | None:
    """SIGKILL 0-200 ms after a checkpoint.tmp appears: inside the write, the seal or the swap."""
    started = time.perf_counter()
    leftover = (folder / "checkpoint.tmp").exists()  # the last kill's, until this run's recovery removes it
    while process.poll() is None:
        writing = (folder / "checkpoint.tmp").exists()
        leftover = leftover and writing
        if writing and not leftover:
            time.sleep(rng.uniform(0, 0.2))
            process.send_signal(signal.SIGKILL)
            process.wait()
            return time.perf_counter() - started
        time.sleep(0.001)
    return None


def state(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint")) if folder.exists() else []
    return " + ".join(names) or "no checkpoint"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="dpo", help="method file to train (without .py)")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 at least this many times")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill instants")
    parser.add_argument("--max_delay", type=float, default=12.0, help="latest kill instant, seconds after start")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_loop_"))
    refs = work / "refs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process

    started = time.perf_counter()
    subprocess.run(
        command(args.method, work / "straight", refs, "--save_steps", "0"), env=env, check=True, capture_output=True
    )
    print(f"uninterrupted run: {time.perf_counter() - started:.0f} s")

    folder, kills, inside, states = work / "killed", 0, 0, collections.Counter()
    runs = 0
    while True:
        resume = ["--resume"] if runs else []
        process = subprocess.Popen(
            command(args.method, folder, refs, "--save_steps", "1", *resume),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs += 1
        if kills < args.kills:
            aimed = kills % 2 == 1  # every other kill waits for a checkpoint write to begin
            when = kill_during_write(process, folder, rng) if aimed else kill_after(process, rng.uniform(0.5, 12))
            if when is not None:
                kills += 1
                left = state(folder)
                states[left] += 1
                inside += ".tmp" in left or ".deleting" in left or ".old" in left
                print(f"kill {kills:2d} {'in a write' if aimed else 'at random'} after {when:5.2f} s: {left}")
                continue
        process.wait()
        if process.returncode != 0:
            sys.exit(f"run {runs} failed (exit {process.returncode}) after {kills} kills:\n{process.stderr.read()}")
        break

    straight, killed = load_file(work / "straight" / "model.safetensors"), load_file(folder / "model.safetensors")
    identical = straight.keys() == killed.keys() and all(torch.equal(straight[k], killed[k]) for k in straight)
    print(f"{kills} kills, {inside} inside a checkpoint write or swap, {runs} runs in all; states left:")
    for left, count in states.most_common():
        print(f"  {count:3d} x {left}")
    print("final weights:", "bit-identical to the uninterrupted run" if identical else "DIFFERENT")
    shutil.rmtree(work)
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
