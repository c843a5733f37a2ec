"""What the checkpoint manifest costs: save and resume times, with the SHA-256 part measured on its own.

A checkpoint is sealed by a manifest of each file's size and SHA-256 (common.seal, after the files are written) and
checked against it before --resume loads it (common.check_manifest). This script times common.save_checkpoint and
the resume path (check_manifest + load_checkpoint) on the tiny model and on a random Qwen2.5-0.5B-shaped model, both
with AdamW state, on one process, and reports the manifest's share. "Without" = the same save or resume minus the
measured manifest time.

    python bench/checkpoint_cost.py                 # tiny and 0.5B-shaped (about 2 minutes on 2 CPU cores)
    python bench/checkpoint_cost.py --models tiny
"""

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

QWEN_05B = Path(__file__).resolve().parent / "configs" / "Qwen2.5-0.5B-Instruct"  # its config.json: the shape


def build(name: str):
    if name == "tiny":
        return common.build_tiny_model(common.build_tiny_tokenizer())
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config.from_pretrained(QWEN_05B))


def timed(module, name: str, seconds: dict):
    """Wrap module.name so that its time adds up in seconds[name]."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started

    setattr(module, name, wrapper)


def measure(name: str, folder: Path, repeats: int, seconds: dict) -> str:
    """One table row; seconds is where the timed common.seal adds up."""
    args = common.TrainArgs(model=name, gradient_checkpointing=False)
    policy = common.shard_model(build(name), args, torch.device("cpu"))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    for p in policy.parameters():  # one step with zero gradients creates AdamW's moments
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    saves, resumes = [], []
    for _ in range(repeats):
        seconds.clear()
        started = time.perf_counter()
        common.save_checkpoint(folder, policy, (optimizer, scheduler), 1, None, {"model": name})
        saves.append((time.perf_counter() - started, seconds["seal"]))
        started = time.perf_counter()
        assert common.check_manifest(folder / common.CHECKPOINT) is None
        verified = time.perf_counter() - started
        common.load_checkpoint(folder / common.CHECKPOINT, policy, optimizer, scheduler)
        resumes.append((time.perf_counter() - started, verified))
    size = sum(f.stat().st_size for f in (folder / common.CHECKPOINT).iterdir()) / 2**30
    save, seal = (min(s[i] for s in saves) for i in range(2))
    resume, verify = (min(r[i] for r in resumes) for i in range(2))
    return (
        f"| {name} | {size:.3f} | {save:.2f} | {seal:.2f} ({seal / save:.0%}) | {save - seal:.2f} "
        f"| {resume:.2f} | {verify:.2f} ({verify / resume:.0%}) | {resume - verify:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen2.5-0.5b-shape"], help="tiny, qwen2.5-0.5b-shape")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many saves and resumes")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    args = parser.parse_args()
    seconds = {}
    timed(common, "seal", seconds)
    common.setup_distributed()
    rows = []
    for name in args.models:
        folder = Path(tempfile.mkdtemp(prefix="checkpoint_cost_", dir=args.dir))
        rows.append(measure(name, folder, args.repeats, seconds))
        shutil.rmtree(folder)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        "| model | checkpoint GB | save s | of it, manifest s | save without manifest s | resume s "
        "| of it, verify s | resume without verify s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
