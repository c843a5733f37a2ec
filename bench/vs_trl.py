"""minpo against TRL 1.16 on the same work: speed and peak memory of preference-optimisation training steps.

Both trainers get the same random-weight Qwen2 model (same seed), the same synthetic pairs (random token ids,
fixed prompt and completion lengths, so no padding on either side), the same micro and global batch, precision,
AdamW learning rate and number of optimizer steps. Warm-up steps are run and left out of the timing. Each trainer
runs in its own process, so each gets its own peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS).

Settings, each side at its fair best:
- DPO: minpo caches reference log-probs before training; TRL's DPOTrainer gets `precompute_ref_log_probs=True`
  (its own fastest option, 1.26x on CPU) and its default fused, chunked LM head. Neither time counts.
- SimPO: minpo's simpo.py against TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0 (TRL's SimPO).
- TRL gets pre-tokenized ids (its tokenisation is skipped, not timed), no logging, saving or evaluation.

    pip install -r bench/requirements.txt           # trl 1.16, for this benchmark only
    python bench/vs_trl.py                           # CPU config: DPO and SimPO, minpo and TRL
    python bench/vs_trl.py --vocab 131072 --methods dpo    # the same at a 4x larger vocabulary
    python bench/vs_trl.py --config gpu              # Qwen2.5-0.5B shape, bf16, 2048 tokens (one GPU)
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parents[1]


@dataclass
class Config:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompt: int  # tokens per prompt
    completion: int  # tokens per chosen and per rejected reply
    micro_batch: int  # pairs per forward
    global_batch: int  # pairs per optimizer step
    steps: int  # timed optimizer steps
    warmup: int  # untimed optimizer steps first
    bf16: bool


CONFIGS = {
    # Small enough for 2 CPU cores in a few minutes, with a vocabulary big enough that the LM head matters.
    "cpu": Config(256, 4, 4, 2, 1024, 32768, 512, 512, 2, 4, 3, 1, False),
    # Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 heads (2 KV), vocabulary 151,936, tied embeddings.
    "gpu": Config(896, 24, 14, 2, 4864, 151936, 1024, 1024, 2, 16, 8, 2, True),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, from the data sheets


# ---- shared by both workers ----


def build_model(config: Config):
    from transformers import AutoModelForCausalLM, Qwen2Config

    model_config = Qwen2Config(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.prompt + config.completion,
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, attn_implementation="sdpa")


def synthetic_pairs(config: Config) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids, enough for every step; ids above 3 so none is a pad or special."""
    generator = torch.Generator().manual_seed(0)
    n_pairs = config.global_batch * (config.warmup + config.steps)

    def ids(n):
        return torch.randint(4, config.vocab, (n,), generator=generator).tolist()

    return [(ids(config.prompt), ids(config.completion), ids(config.completion)) for _ in range(n_pairs)]


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def policy_flops_per_token(model) -> int:
    """6·N for a trained policy, N = non-embedding parameters + the LM head (counted once when tied)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head = model.get_output_embeddings().weight
    n += head.numel() if model.config.tie_word_embeddings else 0
    return 6 * n


# ---- minpo ----


def run_minpo(method: str, config: Config, work_dir: Path) -> dict:
    sys.path.insert(0, str(REPO_DIR))
    import common
    import dpo
    import simpo

    module = {"dpo": dpo, "simpo": simpo}[method]
    args = module.Args(
        model="bench",
        micro_batch_size=config.micro_batch,
        global_batch_size=config.global_batch,
        learning_rate=1e-6,
        bf16=config.bf16,
        ref_cache_dir=str(work_dir / "ref"),
    )
    _, _, device = common.setup_distributed()
    model = build_model(config)
    flops = policy_flops_per_token(model)
    policy = common.shard_model(model, args, device)
    pairs = [common.Pair(*p) for p in synthetic_pairs(config)]
    started = time.perf_counter()
    ref = common.reference_logps(policy, pairs, args, 0, device, "train", print) if module.NEEDS_REFERENCE else None
    precompute_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step_times = []
    for step in range(config.warmup + config.steps):
        batch = list(range(step * config.global_batch, (step + 1) * config.global_batch))
        sync()
        started = time.perf_counter()
        common.train_step(policy, optimizer, scheduler, batch, pairs, ref, module.loss_fn, args, 0, device)
        sync()
        step_times.append(time.perf_counter() - started)
    return {"step_times": step_times[config.warmup :], "precompute_s": precompute_s, "flops_per_token": flops}


# ---- TRL ----


def run_trl(method: str, config: Config, work_dir: Path) -> dict:
    from datasets import Dataset, load_from_disk
    from transformers import TrainerCallback

    sys.path.insert(0, str(REPO_DIR))
    import common  # only for a tokenizer object that knows the pad id; the ids are given

    tokenizer = common.build_tiny_tokenizer()
    tokenizer.pad_token_id = 0
    pairs = synthetic_pairs(config)
    model = build_model(config)
    flops = policy_flops_per_token(model)
    step_times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            step_times.append(time.perf_counter() - self.started)

    common_args = dict(
        output_dir=str(work_dir / "trl"),
        per_device_train_batch_size=config.micro_batch,
        gradient_accumulation_steps=config.global_batch // config.micro_batch,
        max_steps=config.warmup + config.steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        bf16=config.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=None,
        seed=42,
    )
    started = time.perf_counter()
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class PreTokenizedDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset  # already prompt_ids / chosen_ids / rejected_ids: nothing to tokenize

        columns = {"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs]}
        columns["rejected_ids"] = [r for _, _, r in pairs]
        # TRL caches precomputed reference log-probs next to the data set's files: give it files.
        Dataset.from_dict(columns).save_to_disk(work_dir / "data")
        trl_args = DPOConfig(**common_args, beta=0.01, precompute_ref_log_probs=True)
        trainer = PreTokenizedDPOTrainer(
            model=model, args=trl_args, train_dataset=load_from_disk(work_dir / "data"), processing_class=tokenizer
        )
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        class PreTokenizedCPOTrainer(CPOTrainer):
            def tokenize_row(self, feature, model=None):
                prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
                row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
                for name, reply in (("chosen", chosen), ("rejected", rejected)):
                    row[f"{name}_input_ids"] = prompt + reply
                    row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(reply))
                    row[f"{name}_labels"] = [-100] * len(prompt) + reply
                return row

        columns = {"prompt": [""] * len(pairs), "chosen": [""] * len(pairs), "rejected": [""] * len(pairs)}
        columns |= {"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs]}
        columns["rejected_ids"] = [r for _, _, r in pairs]
        common_args["max_length"] = config.prompt + config.completion
        trl_args = CPOConfig(**common_args, loss_type="simpo", cpo_alpha=0.0, beta=2.5, simpo_gamma=0.625)
        trainer = PreTokenizedCPOTrainer(
            model=model, args=trl_args, train_dataset=Dataset.from_dict(columns), processing_class=tokenizer
        )
    precompute_s = time.perf_counter() - started
    trainer.add_callback(StepTimer())
    trainer.train()
    return {"step_times": step_times[config.warmup :], "precompute_s": precompute_s, "flops_per_token": flops}


# ---- driver ----


def worker(trainer: str, method: str, config: Config, threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as work_dir:
        run = run_minpo if trainer == "minpo" else run_trl
        result = run(method, config, Path(work_dir))
    tokens_per_step = config.global_batch * 2 * (config.prompt + config.completion)  # chosen and rejected rows
    step_s = sum(result["step_times"]) / len(result["step_times"])
    result |= {"step_s": step_s, "tokens_per_s": tokens_per_step / step_s, "peak_gb": peak_memory_gb()}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        achieved = result["tokens_per_s"] * result["flops_per_token"]
        result["mfu"] = achieved / (peak * 1e12) if peak else None
    return result


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    return f"CPU: {model or platform.processor()}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(results: dict, config: Config) -> str:
    on_gpu = torch.cuda.is_available()
    memory = "peak GPU memory GB" if on_gpu else "peak RSS GB"
    lines = [
        f"| method | trainer | tokens/s | step s | {memory} |" + (" MFU |" if on_gpu else ""),
        "|---|---|---:|---:|---:|" + ("---:|" if on_gpu else ""),
    ]
    for (method, trainer), r in results.items():
        mfu = f" {100 * r['mfu']:.1f}% |" if on_gpu and r.get("mfu") is not None else (" – |" if on_gpu else "")
        lines.append(
            f"| {method} | {trainer} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_gb']:.2f} |{mfu}"
        )
    for method in dict.fromkeys(m for m, _ in results):
        if (method, "minpo") in results and (method, "trl") in results:
            ours, theirs = results[method, "minpo"], results[method, "trl"]
            speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
            lines.append(
                f"| {method} | minpo / TRL | **{speed:.2f}x** | | **{ours['peak_gb'] / theirs['peak_gb']:.2f}x** |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=["dpo", "simpo"], default=["dpo", "simpo"])
    parser.add_argument("--trainers", nargs="+", choices=["minpo", "trl"], default=["minpo", "trl"])
    parser.add_argument("--vocab", type=int, help="override the config's vocabulary size")
    parser.add_argument("--steps", type=int, help="override the number of timed optimizer steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--worker", nargs=2, metavar=("TRAINER", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = CONFIGS[args.config]
    config = replace(config, vocab=args.vocab or config.vocab, steps=args.steps or config.steps)

    if args.worker:  # one trainer, one method, in this process; the result goes to stdout as the last line
        print(json.dumps(worker(*args.worker, config, args.threads)))
        return

    print(f"{device_name()}; {json.dumps(asdict(config))}", flush=True)
    results = {}
    for method in args.methods:
        for trainer in args.trainers:
            command = [sys.executable, __file__, "--worker", trainer, method, "--config", args.config]
            command += ["--vocab", str(config.vocab), "--steps", str(config.steps), "--threads", str(args.threads)]
            env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"{trainer} {method} failed:\n{done.stderr[-4000:]}")
            results[method, trainer] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[method, trainer]
            print(f"{method} {trainer}: {r['tokens_per_s']:.0f} tokens/s, {r['peak_gb']:.2f} GB", flush=True)
    print(
        f"\n{date.today()}, {device_name()}, vocabulary {config.vocab}: `python bench/{Path(__file__).name} "
        f"{' '.join(sys.argv[1:])}`\n"
    )
    print(table(results, config))


if __name__ == "__main__":
    main()
