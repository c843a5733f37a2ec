"""minpo against TRL 1.16 on the same work: speed and peak memory of preference-optimisation training steps.

Both trainers get the same random-weight Qwen2 model (same seed), the same synthetic pairs (random token ids,
fixed prompt and completion lengths, so no padding on either side), the same micro and global batch, precision,
AdamW learning rate, gradient clipping and number of optimizer steps. Warm-up steps run first and are left out of
the timing. Each trainer runs in its own process, so each gets its own peak memory (GPU:
torch.cuda.max_memory_allocated; CPU: peak RSS of the process).

Settings, each side at its fair best:
- DPO: minpo caches reference log-probs before training; TRL's DPOTrainer gets `precompute_ref_log_probs=True`
  (its fastest option) and its default chunked LM head. Neither precompute is timed. `--trl_live_reference` adds
  a TRL run with its default live reference model.
- SimPO: minpo's simpo.py against TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0 (TRL's SimPO).
- Gradient checkpointing is off on both sides (minpo's default and TRL's faster setting; TRL's own default is on);
  `--gradient_checkpointing` turns it on for both.
- TRL gets pre-tokenized ids (its tokenisation is skipped, not timed), no saving or evaluation, one log at the end.

    pip install -r bench/requirements.txt             # trl 1.16, for this benchmark only
    python bench/vs_trl.py                            # CPU config: DPO and SimPO, minpo and TRL
    python bench/vs_trl.py --vocab 131072             # the same at a 4x larger vocabulary
    python bench/vs_trl.py --config gpu               # Qwen2.5-0.5B shape, bf16, 2048 tokens (one GPU)
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
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

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
    warmup_steps: int  # untimed optimizer steps first
    bf16: bool


CONFIGS = {
    # Small enough for 2 CPU cores in a few minutes, with a vocabulary big enough that the LM head matters.
    "cpu": Config(256, 4, 4, 2, 1024, 32768, 512, 512, 2, 4, 3, 1, False),
    # Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 heads (2 KV), vocabulary 151,936, tied embeddings.
    "gpu": Config(896, 24, 14, 2, 4864, 151936, 1024, 1024, 2, 16, 8, 2, True),
}
# Dense bf16 without sparsity, from the data sheets (H100 SXM; an H100 PCIe has 756: pass --peak_tflops).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
LEARNING_RATE = 1e-6
RUNS = {  # label: (trainer, method)
    "minpo dpo": ("minpo", "dpo"),
    "trl dpo": ("trl", "dpo"),
    "trl dpo, live reference": ("trl_live", "dpo"),
    "minpo simpo": ("minpo", "simpo"),
    "trl simpo": ("trl", "simpo"),
}


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
    torch.manual_seed(0)  # the same weights in every process
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, attn_implementation="sdpa")


def synthetic_pairs(config: Config) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids, one global batch per step; ids from 4 up, so none is the pad id 0."""
    generator = torch.Generator().manual_seed(0)
    n_pairs = config.global_batch * (config.warmup_steps + config.steps)

    def ids(n):
        return torch.randint(4, config.vocab, (n,), generator=generator).tolist()

    return [(ids(config.prompt), ids(config.completion), ids(config.completion)) for _ in range(n_pairs)]


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_memory_gb() -> float:
    """Memory held now (not the peak): what the model, optimizer and data take before the first step."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def sync():
    if torch.cuda.is_available():  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()


def flops_params(model) -> int:
    """N for MFU: non-embedding parameters + the LM head (counted once more when tied to the embeddings)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return n + (model.get_output_embeddings().weight.numel() if model.config.tie_word_embeddings else 0)


def model_state_gb(model) -> float:
    """fp32 weights, gradients and AdamW's two moments: 16 bytes per parameter, whatever the trainer."""
    return 16 * sum(p.numel() for p in model.parameters()) / 2**30


# ---- minpo: its own training path (common.py + the method file), as dpo.py / simpo.py run it ----


def run_minpo(method: str, config: Config, work_dir: Path, gradient_checkpointing: bool) -> dict:
    sys.path.insert(0, str(REPO_DIR))
    import common
    import dpo
    import simpo

    module = {"dpo": dpo, "simpo": simpo}[method]
    args = module.Args(
        model="bench",  # names the reference cache only
        micro_batch_size=config.micro_batch,
        global_batch_size=config.global_batch,
        learning_rate=LEARNING_RATE,
        precision="bf16" if config.bf16 else "fp32",
        gradient_checkpointing=gradient_checkpointing,
        ref_cache_dir=str(work_dir / "ref"),
    )
    _, _, device = common.setup_distributed()
    model = build_model(config)
    info = {"flops_params": flops_params(model), "model_state_gb": model_state_gb(model)}
    policy = common.shard_model(model, args, device)
    pairs = [common.Pair(*p) for p in synthetic_pairs(config)]
    started = time.perf_counter()
    ref = common.reference_logps(policy, pairs, args, 0, device, "train") if module.NEEDS_REFERENCE else None
    info["precompute_s"] = time.perf_counter() - started
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    info["before_train_gb"] = current_memory_gb()
    method = common.Method(module.__name__, module.loss_fn, module.NEEDS_REFERENCE, None)
    no_tokenizer = SimpleNamespace(pad_token_id=0)  # synthetic token ids: pad with 0
    run = common.Run(args, method, work_dir, device, policy, no_tokenizer, pairs, [], ref, None, {})
    step_times = []
    for step in range(config.warmup_steps + config.steps):
        batch = list(range(step * config.global_batch, (step + 1) * config.global_batch))
        sync()
        started = time.perf_counter()
        common.train_step(run, optimizer, scheduler, batch)
        sync()
        step_times.append(time.perf_counter() - started)
    return {"step_times": step_times[config.warmup_steps :], **info}


# ---- TRL ----


def trl_args(config: Config, work_dir: Path, gradient_checkpointing: bool) -> dict:
    """TrainingArguments both TRL trainers share: same batch, lr, clipping and precision as minpo; no overhead
    from logging, saving or evaluation."""
    return dict(
        output_dir=str(work_dir / "trl"),
        per_device_train_batch_size=config.micro_batch,
        gradient_accumulation_steps=config.global_batch // config.micro_batch,
        max_steps=config.warmup_steps + config.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=config.bf16,  # autocast over fp32 weights, TRL's (and transformers') mixed precision
        gradient_checkpointing=gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
    )


def trl_dpo_trainer(pairs, model, tokenizer, args: dict, work_dir: Path, live_reference: bool, config: Config):
    from datasets import Dataset, load_from_disk
    from trl import DPOConfig, DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids: nothing to tokenize

    columns = {
        "prompt_ids": [p for p, _, _ in pairs],
        "chosen_ids": [c for _, c, _ in pairs],
        "rejected_ids": [r for _, _, r in pairs],
    }
    # TRL caches precomputed reference log-probs next to the data set's files: give it files.
    Dataset.from_dict(columns).save_to_disk(work_dir / "data")
    dpo_args = DPOConfig(**args, max_length=None, beta=0.01, precompute_ref_log_probs=not live_reference)
    # A live reference is a second copy of the initial model (TRL would load it from the model's hub name).
    ref_model = build_model(config) if live_reference else None
    return PreTokenizedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_args,
        train_dataset=load_from_disk(work_dir / "data"),
        processing_class=tokenizer,
    )


def trl_simpo_trainer(pairs, model, tokenizer, args: dict, config: Config):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    class PreTokenizedCPOTrainer(CPOTrainer):
        def tokenize_row(self, feature, model=None):  # the row CPOTrainer builds from text, built from our ids
            prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for name, reply in (("chosen", chosen), ("rejected", rejected)):
                row[f"{name}_input_ids"] = prompt + reply
                row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(reply))
                row[f"{name}_labels"] = [-100] * len(prompt) + reply
            return row

    columns = {name: [""] * len(pairs) for name in ("prompt", "chosen", "rejected")}  # CPOTrainer expects them
    columns |= {
        "prompt_ids": [p for p, _, _ in pairs],
        "chosen_ids": [c for _, c, _ in pairs],
        "rejected_ids": [r for _, _, r in pairs],
    }
    # TRL's simpo_gamma is the margin γ itself; minpo's simpo.py default is γ = gamma_beta_ratio · β = 0.25 · 2.5.
    cpo_args = CPOConfig(
        **args,
        max_length=config.prompt + config.completion,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=2.5,
        simpo_gamma=0.625,
    )
    return PreTokenizedCPOTrainer(
        model=model, args=cpo_args, train_dataset=Dataset.from_dict(columns), processing_class=tokenizer
    )


def run_trl(method: str, config: Config, work_dir: Path, gradient_checkpointing: bool, live_reference: bool) -> dict:
    from transformers import TrainerCallback

    sys.path.insert(0, str(REPO_DIR))
    import common  # only for a tokenizer object the trainers require; every id is given

    tokenizer = common.build_tiny_tokenizer()
    tokenizer.pad_token_id = 0
    pairs = synthetic_pairs(config)
    model = build_model(config)
    info = {"flops_params": flops_params(model), "model_state_gb": model_state_gb(model)}
    step_times = []

    class StepTimer(TrainerCallback):
        """From the first micro-batch's forward to the end of the optimizer step (data loading is outside)."""

        def on_train_begin(self, args, state, control, **kwargs):
            info["before_train_gb"] = current_memory_gb()

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            step_times.append(time.perf_counter() - self.started)

    args = trl_args(config, work_dir, gradient_checkpointing)
    started = time.perf_counter()  # construction includes TRL's reference precompute
    if method == "dpo":
        trainer = trl_dpo_trainer(pairs, model, tokenizer, args, work_dir, live_reference, config)
    else:
        trainer = trl_simpo_trainer(pairs, model, tokenizer, args, config)
    info["precompute_s"] = time.perf_counter() - started
    trainer.add_callback(StepTimer())
    trainer.train()
    return {"step_times": step_times[config.warmup_steps :], **info}


# ---- driver ----


def worker(trainer: str, method: str, config: Config, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work_dir:
        if trainer == "minpo":
            result = run_minpo(method, config, Path(work_dir), args.gradient_checkpointing)
        else:
            result = run_trl(method, config, Path(work_dir), args.gradient_checkpointing, trainer == "trl_live")
    # Every token of the chosen and rejected rows (no padding: fixed lengths), counted the same for both.
    tokens_per_step = config.global_batch * 2 * (config.prompt + config.completion)
    step_s = sum(result["step_times"]) / len(result["step_times"])
    result |= {"step_s": step_s, "tokens_per_s": tokens_per_step / step_s, "peak_gb": peak_memory_gb()}
    result["load"] = [load_before, os.getloadavg()[0]]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        # 6N per token for the trained policy, 2N more for a live reference forward.
        flops_per_token = (8 if trainer == "trl_live" else 6) * result["flops_params"]
        result["mfu"] = result["tokens_per_s"] * flops_per_token / (peak * 1e12) if peak else None
    return result


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    return f"CPU: {model or platform.processor()}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(results: dict) -> str:
    on_gpu = torch.cuda.is_available()
    memory = "peak GPU memory GB" if on_gpu else "peak RSS GB"
    lines = [
        f"| run | tokens/s | step s | {memory} | before training GB | load avg |" + (" MFU |" if on_gpu else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if on_gpu else ""),
    ]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} | | | | |" + (" |" if on_gpu else ""))
            continue
        mfu = ""
        if on_gpu:
            mfu = f" {100 * r['mfu']:.1f}% |" if r.get("mfu") is not None else " – |"
        lines.append(
            f"| {label} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_gb']:.2f} | "
            f"{r['before_train_gb']:.2f} | {r['load'][0]:.2f} → {r['load'][1]:.2f} |{mfu}"
        )
    for method in ("dpo", "simpo"):
        for theirs_label in (f"trl {method}", f"trl {method}, live reference"):
            ours, theirs = results.get(f"minpo {method}", {}), results.get(theirs_label, {})
            if "step_s" in ours and "step_s" in theirs:
                speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
                memory_ratio = ours["peak_gb"] / theirs["peak_gb"]
                lines.append(f"| minpo / {theirs_label} | **{speed:.2f}x** | | **{memory_ratio:.2f}x** | | |")
    return "\n".join(lines)


def run_worker(label: str, args: argparse.Namespace, config: Config) -> dict:
    """One trainer and method in a fresh process, so that its peak memory is its own. A failure (e.g. out of
    memory) is reported in the table rather than ending the whole benchmark."""
    trainer, method = RUNS[label]
    command = [sys.executable, __file__, "--worker", trainer, method, "--config", args.config]
    command += ["--vocab", str(config.vocab), "--steps", str(config.steps), "--warmup_steps", str(config.warmup_steps)]
    command += ["--threads", str(args.threads)] + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])
    command += ["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else []
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        print(done.stderr[-4000:], file=sys.stderr)
        error = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no output")
        return {"error": error[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--method", choices=["dpo", "simpo", "both"], default="both")
    parser.add_argument("--vocab", type=int, help="override the config's vocabulary size")
    parser.add_argument("--steps", type=int, help="override the number of timed optimizer steps")
    parser.add_argument("--warmup_steps", type=int, help="override the number of untimed optimizer steps first")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="on for both trainers")
    parser.add_argument("--trl_live_reference", action="store_true", help="also TRL DPO with a live reference model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--peak_tflops", type=float, help="GPU peak for MFU, if not the data sheet's of PEAK_TFLOPS")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--worker", nargs=2, metavar=("TRAINER", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = CONFIGS[args.config]
    overrides = {"vocab": args.vocab, "steps": args.steps, "warmup_steps": args.warmup_steps}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})

    if args.worker:  # one trainer, one method, in this process; the result goes to stdout as the last line
        print(json.dumps(worker(*args.worker, config, args)))
        return

    print(f"{device_name()}; {json.dumps(asdict(config))}", flush=True)
    methods = ["dpo", "simpo"] if args.method == "both" else [args.method]
    labels = [
        label
        for label, (trainer, method) in RUNS.items()
        if method in methods and (trainer != "trl_live" or args.trl_live_reference)
    ]
    results = {}
    for label in labels:
        results[label] = r = run_worker(label, args, config)
        if "error" in r:
            print(f"{label}: failed: {r['error']}", flush=True)
        else:
            print(f"{label}: {r['tokens_per_s']:.0f} tokens/s, {r['peak_gb']:.2f} GB, load {r['load']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"config": asdict(config), "device": device_name(), "results": results}))
    print(
        f"\n{datetime.now():%Y-%m-%d %H:%M}, {device_name()}, threads {args.threads}, vocabulary {config.vocab}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}: "
        f"`python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}`\n"
    )
    model_state = next((r["model_state_gb"] for r in results.values() if "model_state_gb" in r), float("nan"))
    print(f"Model state (fp32 weights, gradients, AdamW moments: 16 bytes per parameter): {model_state:.2f} GB\n")
    print(table(results))


if __name__ == "__main__":
    main()
