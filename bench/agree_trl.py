"""minpo against TRL 1.16, step for step: dpo.py and simpo.py train to the same losses and weights as TRL.

Both sides start from one saved random tiny Qwen2 (model folder written here), train on the same 8 conversational
pairs (UltraFeedback-binarized rows: a prompt string, chosen and rejected as [user, assistant] message lists) as one
batch of 8 (micro batch 8, so the order of the pairs inside the batch does not matter), for 2 epochs = 2 optimizer
steps, with AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), a cosine schedule without warm-up, gradient clipping
at 1.0, fp32 on CPU. minpo runs through its command line (`python dpo.py ...` in a subprocess), so this script does
not depend on common.py's internals; its losses come from metrics.jsonl and its weights from model.safetensors.

- DPO: dpo.py against `trl.DPOTrainer` (loss_type sigmoid), once with TRL's precomputed reference log-probs and
  once with its live reference model; both references are the initial model, as minpo's cached one.
- SimPO: simpo.py against `trl.experimental.cpo.CPOTrainer(loss_type="simpo", cpo_alpha=0)`. TRL's simpo_gamma is
  the margin γ itself, minpo's flag is γ/β: TRL gets simpo_gamma = gamma_beta_ratio · β, the product minpo forms.

Tokens: each trainer tokenizes the rows itself, and the script checks that the ids equal minpo's recipe (prompt =
chat template with the generation prompt; completion = the rest of the template of prompt + reply; no extra BOS or
EOS). DPOTrainer matches exactly once the rows' prompt string is dropped (TRL's "implicit prompt" format: it cannot
read a string prompt next to conversational replies). CPOTrainer appends one EOS after the template's closing
"<|im_end|>\\n"; the script checks that this is the only difference and trains TRL on minpo's ids.

Agreement is checked per step (loss, relative) and on the final weights (largest difference, as a fraction of the
largest distance a weight moved from the initial model); the exit status is 1 if either is outside its tolerance.

    pip install -r bench/requirements.txt     # trl 1.16, for the benchmarks only
    python bench/agree_trl.py                 # DPO (both references) and SimPO, about a minute on 2 CPU cores
    python bench/agree_trl.py --method simpo --learning_rate 1e-4 --simpo_beta 2.0 --gamma_beta_ratio 0.5
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
RUNS = [  # (method, TRL with a live reference model, label)
    ("dpo", False, "dpo.py vs TRL DPOTrainer, precomputed reference"),
    ("dpo", True, "dpo.py vs TRL DPOTrainer, live reference"),
    ("simpo", False, "simpo.py vs TRL CPOTrainer(loss_type='simpo', cpo_alpha=0)"),
]

# Losses are fp32 on both sides, with the log-probs summed in different orders (minpo's chunked LM head, TRL's full
# or fused logits). SimPO's rewards β·ā are about -14, so their rounding is about 1e-6 of the loss (measured 9e-7 at
# step 1); DPO's step 1 is ln 2 exactly on both sides (policy = reference). 1e-5 leaves 10x for other CPUs and threads.
LOSS_RTOL = 1e-5
# Adam's first update is lr · g / (|g| + eps): a weight whose gradient is near eps (1e-8) moves by an amount that the
# gradient's float rounding decides, a fraction of lr. Such weights are few (DPO: 5 of 435,328 differ by more than
# 1e-6, each with a clipped step-1 gradient of 1e-9 to 1e-8; the others by < 7e-7). The largest difference is
# therefore a fraction of the movement, not float epsilon: measured 1-3%, allowed 10%. A real difference in the
# update moves most weights by a large part of lr (TRL with Adam eps 1e-6: 81%, and the step-2 loss by 2.6e-4).
WEIGHT_FRAC = 0.1

# (prompt, chosen reply, rejected reply): lengths differ within and across pairs, so both trainers pad.
PAIRS = [
    ("Write in small letters: Sugar Seven Green", "sugar seven green", "SUGAR SEVEN green"),
    ("Say in UPPER case: Pilot Voice Plant Cloud Yellow", "PILOT VOICE PLANT CLOUD YELLOW", "pilot voice"),
    ("What is 7 times 6?", "7 times 6 is 42.", "It is 48, since seven sixes make forty-eight."),
    ("Name a colour of the sky.", "Blue, on a clear day.", "Green."),
    ("Translate 'bonjour' into English.", "Hello (or good morning).", "Bonjour means goodbye in English."),
    ("Give one word that rhymes with cat.", "Hat.", "Dog rhymes with cat, as does the word table."),
    ("Count from one to five.", "One, two, three, four, five.", "One, two, four."),
    ("Reply with the word yes and nothing else.", "yes", "Sure! Here is the word you asked for: yes."),
]


def ultrafeedback_rows() -> list[dict]:
    """The pairs in the UltraFeedback-binarized schema, which minpo reads as it is."""
    return [
        {
            "prompt": prompt,
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
        }
        for prompt, chosen, rejected in PAIRS
    ]


def write_inputs(work_dir: Path) -> tuple[Path, Path]:
    """The initial model folder (random tiny Qwen2 and its ChatML tokenizer) and the pairs file both sides read."""
    sys.path.insert(0, str(REPO_DIR))
    import common  # only its two builders of the tiny model, which the tests and the README rely on too

    tokenizer = common.build_tiny_tokenizer()
    model_dir = work_dir / "initial_model"
    common.build_tiny_model(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs_file = work_dir / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(row) + "\n" for row in ultrafeedback_rows()))
    return model_dir, pairs_file


def minpo_ids(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids by minpo's recipe, as its README states it: the prompt is the chat template
    with the generation prompt; a completion is the rest of the template of prompt + reply."""

    def ids(messages, generation_prompt):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(row["chosen"][:-1], True)
    chosen, rejected = ids(row["chosen"], False), ids(row["rejected"], False)
    assert chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# ---- minpo: its command line ----


def run_minpo(method: str, args: argparse.Namespace, model_dir: Path, pairs_file: Path, out_dir: Path) -> dict:
    """Losses and grad norms of each step, and the final weights."""
    command = [args.minpo_python, str(REPO_DIR / f"{method}.py"), "--model", str(model_dir)]
    command += ["--data", str(pairs_file), "--test_data", str(pairs_file), "--output_dir", str(out_dir)]
    command += ["--ref_cache_dir", str(out_dir.parent / "ref_cache"), "--global_batch_size", "8"]
    command += ["--micro_batch_size", "8", "--num_epochs", "2", "--warmup_ratio", "0", "--max_grad_norm", "1.0"]
    command += ["--weight_decay", "0", "--learning_rate", str(args.learning_rate)]
    if method == "dpo":
        command += ["--beta", str(args.dpo_beta), "--label_smoothing", "0"]
    else:
        command += ["--beta", str(args.simpo_beta), "--gamma_beta_ratio", str(args.gamma_beta_ratio)]
    done = subprocess.run(command, capture_output=True, text=True, env=quiet_env(), cwd=REPO_DIR)
    if done.returncode:
        sys.exit(f"{method}.py failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]  # step 0 is the held-out evaluation before training
    return {
        "losses": [r["loss"] for r in steps],
        "grad_norms": [r["grad_norm"] for r in steps],
        "weights": read_weights(out_dir / "model.safetensors"),
    }


# ---- TRL ----


def trl_training_args(args: argparse.Namespace, out_dir: Path) -> dict:
    """TrainingArguments of both TRL trainers, set to minpo's run."""
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        num_train_epochs=2,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        bf16=False,  # TRL's configs default to bf16 autocast, also on CPU
        gradient_checkpointing=False,  # TRL's default is on: same values, slower
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
    )


class RecordLosses:
    """Mixin: keep each training step's loss at full precision (one micro-batch per step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.step_losses.append((loss[0] if return_outputs else loss).item())
        return loss


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def trl_dpo(args: argparse.Namespace, model_dir: Path, out_dir: Path, live_reference: bool):
    from datasets import Dataset, load_from_disk
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class Trainer(RecordLosses, DPOTrainer):
        pass

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # DPOTrainer reads a string prompt next to conversational replies as neither format (and fails), so it gets
    # the replies alone and takes the shared user turn as the prompt (extract_prompt).
    rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in ultrafeedback_rows()]
    # TRL caches precomputed reference log-probs next to the data set's files: give it files.
    Dataset.from_list(rows).save_to_disk(out_dir / "data")
    config = DPOConfig(
        **trl_training_args(args, out_dir),
        beta=args.dpo_beta,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        max_length=None,
        precompute_ref_log_probs=not live_reference,
    )
    trainer = Trainer(
        model=load_model(model_dir),
        ref_model=load_model(model_dir) if live_reference else None,
        args=config,
        train_dataset=load_from_disk(out_dir / "data"),
        processing_class=tokenizer,
    )
    for row, tokenized in zip(ultrafeedback_rows(), trainer.train_dataset):
        theirs = tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"]
        if tuple(theirs) != minpo_ids(tokenizer, row):
            sys.exit(f"DPOTrainer tokenized {row['prompt']!r} differently from minpo: {theirs}")
    return trainer, "DPOTrainer's own tokenization, equal to minpo's ids"


def trl_simpo(args: argparse.Namespace, model_dir: Path, out_dir: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = ultrafeedback_rows()
    ours = [minpo_ids(tokenizer, row) for row in rows]
    eos = tokenizer.eos_token_id

    class Trainer(RecordLosses, CPOTrainer):
        def tokenize_row(self, feature, model=None):
            """TRL's row, checked against minpo's ids, which it then carries."""
            row = super().tokenize_row(feature, model)
            prompt, chosen, rejected = ours[feature["pair"]]
            for name, reply in (("chosen", chosen), ("rejected", rejected)):
                # CPOTrainer appends EOS unless the reply ends with it; the template ends a turn with "<|im_end|>\n".
                if row[f"{name}_input_ids"] != prompt + reply + [eos]:
                    sys.exit(f"CPOTrainer tokenized {feature['prompt']!r} unlike minpo + EOS: {row}")
                row[f"{name}_input_ids"] = prompt + reply
                row[f"{name}_attention_mask"] = [1] * len(prompt + reply)
                row[f"{name}_labels"] = [-100] * len(prompt) + reply
            return row

    config = CPOConfig(
        **trl_training_args(args, out_dir),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=args.simpo_beta,
        simpo_gamma=args.gamma_beta_ratio * args.simpo_beta,  # the absolute margin, computed as simpo.py does
        label_smoothing=0.0,
        max_length=4096,
        remove_unused_columns=False,  # its collator needs every column; CPOTrainer warns and sets it otherwise
    )
    data = Dataset.from_list([row | {"pair": i} for i, row in enumerate(rows)])
    trainer = Trainer(model=load_model(model_dir), args=config, train_dataset=data, processing_class=tokenizer)
    note = "CPOTrainer's ids = minpo's + one EOS after each completion's '<|im_end|>\\n'; trained on minpo's ids"
    return trainer, note


def run_trl(method: str, args: argparse.Namespace, model_dir: Path, out_dir: Path, live_reference: bool) -> dict:
    from transformers import PrinterCallback

    if method == "dpo":
        trainer, tokens = trl_dpo(args, model_dir, out_dir, live_reference)
    else:
        trainer, tokens = trl_simpo(args, model_dir, out_dir)
    trainer.remove_callback(PrinterCallback)  # with tqdm off, the Trainer prints every log dict
    trainer.train()
    grad_norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    weights = {name: w.detach().clone() for name, w in trainer.model.state_dict().items()}
    return {"losses": trainer.step_losses, "grad_norms": grad_norms, "weights": weights, "tokens": tokens}


# ---- comparison ----


def quiet_env() -> dict:
    """Offline, and no progress bars: the tables are the output."""
    quiet = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return {
        **os.environ,
        **quiet,
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


def max_abs_diff(a: dict, b: dict, names) -> tuple[float, str]:
    """The largest |a - b| over the named tensors, and the tensor where it is."""
    return max(((a[n] - b[n]).abs().max().item(), n) for n in names)


def compare(label: str, ours: dict, theirs: dict, initial: dict) -> bool:
    """Print the two runs side by side; True if they agree within the tolerances."""
    names = sorted(initial)
    if set(ours["weights"]) != set(names) or not set(names) <= set(theirs["weights"]):
        sys.exit(f"{label}: the weight names differ: {sorted(set(ours['weights']) ^ set(theirs['weights']))}")
    print(f"\n{label}   tokens: {theirs['tokens']}")
    print("| step | loss, minpo | loss, TRL | abs. diff | rel. diff | grad norm, minpo | grad norm, TRL |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ok = len(ours["losses"]) == len(theirs["losses"]) == 2
    for step, (a, b) in enumerate(zip(ours["losses"], theirs["losses"]), 1):
        rel = abs(a - b) / abs(b)
        ok &= rel <= LOSS_RTOL
        norms = ours["grad_norms"][step - 1], theirs["grad_norms"][step - 1]
        print(f"| {step} | {a:.9f} | {b:.9f} | {abs(a - b):.1e} | {rel:.1e} | {norms[0]:.6f} | {norms[1]:.6f} |")
    diff, where = max_abs_diff(ours["weights"], theirs["weights"], names)
    moved, moved_where = max_abs_diff(theirs["weights"], initial, names)
    moved_ours, _ = max_abs_diff(ours["weights"], initial, names)
    ok &= diff <= WEIGHT_FRAC * moved
    n_far = sum(int(((ours["weights"][n] - theirs["weights"][n]).abs() > 1e-3 * moved).sum()) for n in names)
    n_weights = sum(initial[n].numel() for n in names)
    print(
        f"weights after 2 steps: largest |minpo - TRL| {diff:.1e} ({where}) of the {moved:.1e} they move "
        f"(TRL, {moved_where}; minpo {moved_ours:.1e}): {diff / moved:.1%}; "
        f"{n_far} of {n_weights:,} weights differ by more than 0.1% of it"
    )
    tolerances = f"loss {LOSS_RTOL:.0e} relative, weights {WEIGHT_FRAC:.0%} of the movement"
    print(f"{label}: {'agree' if ok else 'DISAGREE'} (tolerances: {tolerances})")
    return ok


def device_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    return f"CPU: {model or platform.processor()}, {os.cpu_count()} cores"


def versions() -> str:
    import transformers
    import trl

    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["dpo", "simpo", "both"], default="both")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="large enough that two steps show")
    parser.add_argument("--dpo_beta", type=float, default=0.1)
    parser.add_argument("--simpo_beta", type=float, default=2.5, help="simpo.py's default")
    parser.add_argument("--gamma_beta_ratio", type=float, default=0.25, help="simpo.py's γ/β; TRL gets γ = ratio · β")
    parser.add_argument("--minpo_python", default=sys.executable, help="interpreter for dpo.py / simpo.py")
    parser.add_argument(
        "--work_dir", type=Path, help="a new folder to keep the model, pairs and runs in (default: temporary)"
    )
    args = parser.parse_args()
    if args.work_dir and args.work_dir.exists() and any(args.work_dir.iterdir()):
        parser.error(f"--work_dir {args.work_dir} is not empty: give a new folder")
    os.environ.update(quiet_env())

    print(f"{datetime.now():%Y-%m-%d %H:%M}, {device_name()}, {torch.get_num_threads()} torch threads, {versions()}")
    print("`" + " ".join(["python", f"bench/{Path(__file__).name}", *sys.argv[1:]]) + "`")
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        model_dir, pairs_file = write_inputs(work_dir)
        initial = read_weights(model_dir / "model.safetensors")
        methods = ["dpo", "simpo"] if args.method == "both" else [args.method]
        agree, minpo_runs = True, {}
        for method, live_reference, label in (run for run in RUNS if run[0] in methods):
            if method not in minpo_runs:
                minpo_runs[method] = run_minpo(method, args, model_dir, pairs_file, work_dir / f"minpo_{method}")
            trl_dir = work_dir / (f"trl_{method}" + ("_live" if live_reference else ""))
            theirs = run_trl(method, args, model_dir, trl_dir, live_reference)
            agree &= compare(label, minpo_runs[method], theirs, initial)
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
