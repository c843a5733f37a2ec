"""minpo common: everything the method files share, and nothing that differs between them.

Sections come in the order a run uses them; the last, "the run", strings them together: train() checks the flags
and claims the folder, start_run() reads the data, loads the model and the reference log-probs, run_steps() makes
the optimizer, resumes, takes the steps and saves the model. Map:

    arguments          TrainArgs, parse_args, check_args
    model, tokenizer   load_tokenizer, load_model (dropout off)
    data               read_rows -> parse_rows (every row checked once, named by file and row) -> load_data,
                       select_and_flip -> tokenize_pairs -> collate
    log-probs          LogpsModel: one forward, batch_logps (lm_head in chunks: ChunkedTokenLogps) -> PairLogps
    distributed        setup_distributed (one code path, one process or many), on_rank0, shard_model (FSDP2)
    output folder      claim_output_dir (one run at a time), write_json, Trackers, read_metrics
    reference          all_pairs_logps, reference_logps (the initial model's, cached on disk)
    checkpoints        save_checkpoint / resume (sealed by a manifest, swapped in by swap_in), save_model
    training loop      evaluate, train_step, StopSignal
    the run            Method, Run, train -> start_run -> run_steps -> finish_run; main
    tiny run           TINY_DEFAULTS, build_tiny_tokenizer, build_tiny_model (--model tiny)

Loss math, β/γ/α and method defaults live in the method files (dpo.py, simpo.py, ...), never here.
"""

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import random
import resource
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import tyro
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

REPO_DIR = Path(__file__).resolve().parent
TINY_DATA_DIR = REPO_DIR / "data" / "tiny"


class InputError(ValueError):
    """Bad input from the user: printed as one line, no traceback (exit 2)."""


class RunStopped(Exception):
    """The run stopped early on purpose (a signal, a non-finite loss, a full disk): one line and its exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException) -> str:
    """The gist of a library's (often multi-line) error, for a one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def log(message: str) -> None:
    """One line from rank 0: every rank runs the same code, one of them speaks."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(f"[minpo] {message}")


# ---- arguments ----


@dataclass
class TrainArgs:
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    """hub name, local model folder, or 'tiny' (random, built in code; also sets one-minute CPU run defaults)"""
    data: str = "HuggingFaceH4/ultrafeedback_binarized"
    """hub data set, local .jsonl/.json/.parquet file or folder with train/test files, or 'tiny'"""
    train_split: str = "train_prefs"
    """split to train on (hub data sets)"""
    test_split: str = "test_prefs"
    """held-out split for reward accuracy (hub data sets)"""
    test_data: str | None = None
    """held-out file for a local training file; without it 5% of the training rows are held out"""
    max_train_samples: int | None = None
    """use only the first N training pairs (leave it out to use every one)"""
    max_test_samples: int | None = 1000
    """use only the first N held-out pairs"""
    select_frac: float = 1.0
    """keep this fraction of the training pairs: those with the largest score_chosen - score_rejected"""
    flip_frac: float = 0.0
    """swap chosen and rejected in this seeded random fraction of the training pairs (after --select_frac);
    held-out pairs are never flipped"""
    output_dir: str | None = None
    """where the model, metrics and checkpoints go; None: ckpt/<method>"""
    max_length: int = 2048
    """prompt + completion tokens; a longer pair has its prompt cut to max_prompt_length, then its replies"""
    max_prompt_length: int = 1800
    """prompt tokens kept (the last ones) when a pair is longer than max_length; must be < max_length"""
    global_batch_size: int = 128
    """pairs per optimizer step, over all processes (= micro_batch_size x accumulation x world size)"""
    micro_batch_size: int = 2
    """pairs per forward on each process"""
    num_epochs: int = 1
    """passes over the training pairs"""
    learning_rate: float = 5e-7
    """peak AdamW learning rate"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warm-up, then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (0: no clipping)"""
    seed: int = 42
    """seed for data order and the tiny model"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 compute over fp32 master weights on GPU, fp32 on CPU; bf16 asks for it on CPU too"""
    gradient_checkpointing: bool = True
    """recompute decoder activations in backward: about one more forward, much less memory"""
    gradient_sync: Literal["micro_batch", "step"] = "micro_batch"
    """reduce-scatter gradients after every micro-batch (FSDP accumulates sharded gradients: least memory), or
    once per step (each GPU holds the full fp32 gradient between micro-batches)"""
    logps_chunk_size: int = 256
    """completion tokens per lm_head chunk (one chunk x vocabulary fp32 buffer); [N, T, V] never exists"""
    eval_steps: int = 0
    """also measure held-out reward accuracy every N steps (0: only at start and end)"""
    save_steps: int = 100
    """write a resumable checkpoint every N steps (0: only when stopped by SIGTERM or SIGINT)"""
    resume: bool = False
    """continue from output_dir/checkpoint with the same flags; a checkpoint folder is trusted like code (torch's
    checkpoint metadata is a pickle)"""
    ref_cache_dir: str = "~/.cache/minpo/ref_logps"
    """where reference log-probs are cached, shared by every method"""
    report_to: tuple[Literal["tensorboard", "wandb", "trackio"], ...] = ()
    """also send every metrics.jsonl record to these trackers (output_dir/tensorboard; wandb and trackio project
    'minpo'); none by default, and none is a requirement"""


# Flags a resumed run may change: they change how the work is done, not its result.
RESUME_MAY_CHANGE = {
    "output_dir",
    "resume",
    "micro_batch_size",
    "gradient_checkpointing",
    "gradient_sync",
    "logps_chunk_size",
    "eval_steps",
    "save_steps",
    "ref_cache_dir",
    "report_to",
}


def parse_args(args_cls: type[TrainArgs], argv: list[str] | None = None) -> TrainArgs:
    argv = sys.argv[1:] if argv is None else argv
    args = tyro.cli(args_cls, args=argv, use_underscores=True, description=sys.modules[args_cls.__module__].__doc__)
    if args.model == "tiny":
        given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        given |= {name.removeprefix("no_") for name in given}  # --no_gradient_checkpointing
        for name, value in TINY_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
    return args


NOTES = {
    "max_grad_norm": " (0 turns clipping off)",
    "max_train_samples": " (leave it out to use every training pair)",
    "max_test_samples": " (leave it out to use every held-out pair)",
}


def check_args(args: TrainArgs, world_size: int) -> None:
    """Every numeric flag in range, before any work: one line naming the flag."""
    for field in fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{field.name} must be a finite number, got {value}")
    lowest = dict(micro_batch_size=1, global_batch_size=1, num_epochs=1, logps_chunk_size=1, max_length=2)
    lowest |= dict(max_prompt_length=1, max_train_samples=1, max_test_samples=1, eval_steps=0, save_steps=0, seed=0)
    lowest |= dict(weight_decay=0, max_grad_norm=0)
    for name, low in lowest.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise InputError(f"--{name} must be at least {low}, got {value}" + (NOTES.get(name) or ""))
    if not args.learning_rate > 0:
        raise InputError(f"--learning_rate must be positive, got {args.learning_rate}")
    if not 0 <= args.warmup_ratio <= 1:
        raise InputError(f"--warmup_ratio {args.warmup_ratio} must be in [0, 1]: the fraction of steps with warm-up")
    if not 0 <= args.flip_frac < 1:
        raise InputError(f"--flip_frac {args.flip_frac} must be in [0, 1): the fraction of training labels to swap")
    if not 0 < args.select_frac <= 1:
        raise InputError(f"--select_frac {args.select_frac} must be in (0, 1]: the fraction of training pairs to keep")
    if args.max_prompt_length >= args.max_length:
        raise InputError(
            f"--max_prompt_length {args.max_prompt_length} must be smaller than --max_length {args.max_length}, "
            "or no completion token is left"
        )
    if args.global_batch_size % (args.micro_batch_size * world_size):
        raise InputError(
            f"--global_batch_size {args.global_batch_size} is not a multiple of --micro_batch_size "
            f"{args.micro_batch_size} x {world_size} processes; pick sizes that divide"
        )


def uses_bf16(args: TrainArgs, device: torch.device) -> bool:
    return args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")


# ---- model and tokenizer ----


def _cannot_load(name: str, error: Exception) -> InputError:
    hint = "pass a hub name, a local model folder, or 'tiny'"
    return InputError(f"could not load model '{name}': {first_line(error)} ({hint})")


def load_tokenizer(name: str):
    """The tokenizer alone, so data errors show up before a large model is loaded."""
    if name == "tiny":
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()
    if looks_local and not (Path(name).expanduser() / "config.json").is_file():
        raise InputError(f"{name} is not a model folder (no config.json); pass a hub name, a model folder, or 'tiny'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise _cannot_load(name, e) from None
    if not tokenizer.chat_template:
        raise InputError(f"model '{name}' has no chat template: minpo tokenizes with the model's own template")
    return tokenizer


def load_model(name: str, tokenizer, dtype=torch.float32, seed: int = 0, empty: bool = False):
    """empty=True builds the architecture on the meta device, without weights: ranks other than 0 do
    this and receive the weights from rank 0 once sharded, so a node reads and holds the model once."""
    if name == "tiny":
        with torch.device("meta") if empty else contextlib.nullcontext():
            return disable_dropout(build_tiny_model(tokenizer, seed, dtype))
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if empty:
            with torch.device("meta"):
                config = AutoConfig.from_pretrained(name, trust_remote_code=False)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise _cannot_load(name, e) from None
    return disable_dropout(model)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off, as TRL (disable_dropout=True) and SimPO do: the policy trains in train mode while reference and
    held-out log-probs come from eval mode, so dropout would put noise into every log-ratio. Attention dropout is a
    float on the attention module in transformers, not an nn.Dropout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


# ---- data ----


class Example(NamedTuple):
    """One preference pair, checked once right after reading, with the file row it came from."""

    prompt: list[dict]  # the conversation before the replies: [{role, content}, ...]
    chosen: list[dict]  # the chosen completion: the assistant turn(s) that follow the prompt
    rejected: list[dict]
    where: str  # "file: row n", for every later message about this pair
    scores: tuple  # (score_chosen, score_rejected) as given; only --select_frac reads them


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(file row number, row) of a local .jsonl, .json or .parquet file, with the line named when JSON is broken."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: row {line_no}: not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise InputError(f"{path}: expected a JSON list of rows")
        return list(enumerate(rows, 1))
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(path).to_pylist(), 1))
        except pyarrow.ArrowException as e:
            raise InputError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    raise InputError(f"{path}: unknown data file type {path.suffix!r} (use .jsonl, .json or .parquet)")


# The preference formats TRL reads, decided once per file by its first row (the UltraFeedback-binarized schema is the
# first): each row then must be in it, or an error names the file, row and field.
FORMATS = {
    "prompt string": "'prompt' a string; 'chosen' and 'rejected' strings or conversations ending with the reply",
    "conversational": "'prompt' a list of messages; 'chosen' and 'rejected' the assistant turn(s) that follow it",
    "implicit prompt": "no 'prompt'; 'chosen' and 'rejected' whole conversations whose shared start is the prompt",
}


def row_format(row) -> str:
    if not isinstance(row, dict) or "prompt" not in row:
        return "implicit prompt"
    return "conversational" if isinstance(row["prompt"], list) else "prompt string"


def _messages(value, where: str) -> list[dict]:
    """A non-empty list of {role, content} messages, checked, as plain dicts."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for k, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"{where}: message {k} needs a string 'role'")
        if not isinstance(message.get("content"), str):
            raise InputError(f"{where}: message {k} needs a string 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _completion(messages: list[dict], where: str) -> list[dict]:
    """The assistant turn(s) after the prompt: they start and end with an assistant message that says something."""
    if messages[0]["role"] != "assistant" or messages[-1]["role"] != "assistant":
        role = messages[-1]["role"] if messages[0]["role"] == "assistant" else messages[0]["role"]
        raise InputError(f"{where}: the reply must start and end with an assistant message, found role '{role}'")
    if not messages[-1]["content"].strip():
        raise InputError(f"{where}: empty assistant reply")
    return messages


def _reply(value, where: str) -> tuple[list[dict] | None, list[dict]]:
    """A chosen/rejected value in the prompt-string format -> (messages before the reply or None, [the reply])."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: empty reply")
        return None, [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: expected a non-empty string or list of {{role, content}} messages")
    messages = _messages(value, where)
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{where}: the last message must be the assistant reply, got role '{messages[-1]['role']}'")
    return messages[:-1], _completion(messages[-1:], where)


def _prompt_string_row(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """UltraFeedback-binarized's format: the conversations in chosen/rejected win over the 'prompt' string."""
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise InputError(f"{where}: field 'prompt' must be a non-empty string, as in the file's first row")
    chosen_prefix, chosen = _reply(row["chosen"], f"{where}: field 'chosen'")
    rejected_prefix, rejected = _reply(row["rejected"], f"{where}: field 'rejected'")
    if chosen_prefix and rejected_prefix is not None and chosen_prefix != rejected_prefix:
        raise InputError(f"{where}: fields 'chosen' and 'rejected' start from different conversations")
    return chosen_prefix or rejected_prefix or [{"role": "user", "content": row["prompt"]}], chosen, rejected


def _conversational_row(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    prompt = _messages(row["prompt"], f"{where}: field 'prompt'")
    replies = [_completion(_messages(row[f], f"{where}: field '{f}'"), f"{where}: field '{f}'") for f in FIELDS]
    return prompt, *replies


def _implicit_row(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit prompt: the messages chosen and rejected start with."""
    if "prompt" in row:
        raise InputError(f"{where}: field 'prompt' is here, but the file's first row has none (implicit prompt)")
    chosen, rejected = (_messages(row[f], f"{where}: field '{f}'") for f in FIELDS)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise InputError(f"{where}: fields 'chosen' and 'rejected' start from different conversations")
    if shared == min(len(chosen), len(rejected)):
        raise InputError(f"{where}: fields 'chosen' and 'rejected' do not differ after their shared start")
    if chosen[shared]["role"] != "assistant" or rejected[shared]["role"] != "assistant":
        raise InputError(f"{where}: fields 'chosen' and 'rejected' part before the assistant's reply")
    replies = [_completion(m[shared:], f"{where}: field '{f}'") for m, f in zip((chosen, rejected), FIELDS)]
    return chosen[:shared], *replies


FIELDS = ("chosen", "rejected")
PARSERS = {"prompt string": _prompt_string_row, "conversational": _conversational_row, "implicit prompt": _implicit_row}


def parse_row(row, where: str, fmt: str = "prompt string") -> Example:
    """One data row in its file's format -> an Example, or an error naming file, row and field."""
    fields = FIELDS if fmt == "implicit prompt" else ("prompt", *FIELDS)
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with {', '.join(fields)}")
    for field in fields:
        if row.get(field) is None:
            raise InputError(f"{where}: field '{field}' is missing")
    prompt, chosen, rejected = PARSERS[fmt](row, where)
    return Example(prompt, chosen, rejected, where, (row.get("score_chosen"), row.get("score_rejected")))


def parse_rows(rows: list[tuple[int, dict]], source: str) -> list[Example]:
    """Every row checked once, in the format of the file's first row; a warning when the 'prompt' field is not what
    the messages say (they win)."""
    if not rows:
        raise InputError(f"{source}: no rows")
    fmt = row_format(rows[0][1])
    examples = [parse_row(row, f"{source}: row {row_no}", fmt) for row_no, row in rows]
    ignored = fmt == "prompt string" and sum(  # only this format has both a 'prompt' and the messages
        isinstance(row["chosen"], list)
        and row["prompt"] not in [m["content"] for m in ex.prompt if m["role"] == "user"]
        for (_, row), ex in zip(rows, examples)
    )
    if ignored:
        log(
            f"warning: {source}: in {ignored} rows the 'prompt' field is none of the user turns in 'chosen'; "
            "the messages are used (as in SimPO's code), the 'prompt' field is ignored"
        )
    return examples


def find_split_file(folder: Path, split: str) -> Path:
    for suffix in (".jsonl", ".json", ".parquet"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    raise InputError(f"{folder}: no {split}.jsonl, {split}.json or {split}.parquet in this folder")


def load_data(args: TrainArgs) -> tuple[list[Example], str, list[Example], str]:
    """(training pairs, their source's name, held-out pairs, theirs), every row checked."""
    if args.data == "tiny" or Path(args.data).expanduser().is_dir():
        folder = TINY_DATA_DIR if args.data == "tiny" else Path(args.data).expanduser()
        train_file, test_file = find_split_file(folder, "train"), find_split_file(folder, "test")
        train_rows = parse_rows(read_rows(train_file), str(train_file))
        test_rows = parse_rows(read_rows(test_file), str(test_file))
        sources = str(train_file), str(test_file)
    elif args.data.endswith((".jsonl", ".json", ".parquet")):
        train_rows = parse_rows(read_rows(Path(args.data).expanduser()), args.data)
        sources = args.data, args.test_data
        if args.test_data:
            test_rows = parse_rows(read_rows(Path(args.test_data).expanduser()), args.test_data)
        else:  # hold out 5% of the rows, seeded
            order = np.random.default_rng(args.seed).permutation(len(train_rows))
            n_test = min(1000, max(1, len(train_rows) // 20))
            test_rows = [train_rows[i] for i in sorted(order[:n_test])]
            train_rows = [train_rows[i] for i in sorted(order[n_test:])]
            sources = (f"{args.data} (train part)", f"{args.data} (held-out part)")
    else:
        from datasets import load_dataset

        try:
            hub_train = load_dataset(args.data, split=args.train_split).to_list()
            hub_test = load_dataset(args.data, split=args.test_split).to_list()
        except Exception as e:  # hub, network and split errors all end here
            raise InputError(
                f"could not load data set '{args.data}' ({type(e).__name__}: {first_line(e)}); "
                "pass a hub name, a local .jsonl/.json/.parquet file or folder, or 'tiny'"
            ) from None
        sources = f"{args.data}[{args.train_split}]", f"{args.data}[{args.test_split}]"
        train_rows = parse_rows(list(enumerate(hub_train, 1)), sources[0])
        test_rows = parse_rows(list(enumerate(hub_test, 1)), sources[1])
    train_rows = train_rows[: args.max_train_samples] if args.max_train_samples else train_rows
    test_rows = test_rows[: args.max_test_samples] if args.max_test_samples else test_rows
    return train_rows, sources[0], test_rows, sources[1]


def held_out_in_training(train_rows: list[Example], test_rows: list[Example]) -> int:
    """Held-out pairs that also sit in the training data (same prompt and the same two replies, either way round)."""

    def key(ex: Example):
        return json.dumps(ex.prompt), frozenset((json.dumps(ex.chosen), json.dumps(ex.rejected)))

    seen = {key(ex) for ex in train_rows}
    return sum(key(ex) in seen for ex in test_rows)


def score_gap(ex: Example) -> float:
    for field, value in zip(("score_chosen", "score_rejected"), ex.scores):
        if value is None:
            raise InputError(f"{ex.where}: field '{field}' is missing; --select_frac ranks pairs by their score gap")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"{ex.where}: field '{field}' must be a finite number, got {value!r}")
    return ex.scores[0] - ex.scores[1]


def select_and_flip(
    examples: list[Example], select_frac: float, flip_frac: float, seed: int
) -> tuple[list[Example], dict]:
    """--select_frac, then --flip_frac, on the training pairs.

    Selection keeps the round(q x N) pairs with the largest score gap (ties: the earlier row), in file order.
    Flipping swaps chosen and rejected in round(p x kept) pairs drawn with --seed: the same pairs on every
    rank and every resume. Returns the pairs and the counts for the log and args.json.
    """
    counts = {"loaded": len(examples)}
    if select_frac < 1:
        gaps = [score_gap(ex) for ex in examples]
        by_gap = sorted(range(len(examples)), key=lambda i: -gaps[i])  # stable: ties keep file order
        examples = [examples[i] for i in sorted(by_gap[: round(select_frac * len(examples))])]
        counts["kept"] = len(examples)
    if flip_frac > 0:
        flipped = np.random.default_rng([seed, 7]).choice(
            len(examples), round(flip_frac * len(examples)), replace=False
        )
        examples = list(examples)
        for i in flipped:
            ex = examples[i]
            examples[i] = ex._replace(chosen=ex.rejected, rejected=ex.chosen, scores=ex.scores[::-1])
        counts["flipped"] = len(flipped)
    return examples, counts


class Pair(NamedTuple):
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion tokens only
    rejected_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def tokenize_pairs(
    examples: list[Example], tokenizer, max_length: int, max_prompt_length: int
) -> tuple[list[Pair], int]:
    """Pairs -> token pairs with the model's chat template, and how many pairs truncation emptied.

    Prompt ids = template(prompt, add_generation_prompt=True); completion ids = template(prompt + reply)
    minus that prefix. No extra BOS/EOS: the template already has what the model expects.
    Truncation, only for a pair longer than max_length, as the original DPO and SimPO trainers do: first keep
    the last max_prompt_length prompt tokens; if still too long, cut both replies to max_length - max_prompt_length.
    """
    texts = []
    for ex in examples:
        try:
            texts += [
                tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True),
                tokenizer.apply_chat_template(ex.prompt + ex.chosen, tokenize=False),
                tokenizer.apply_chat_template(ex.prompt + ex.rejected, tokenize=False),
            ]
        except Exception as e:  # the template's own check, e.g. Gemma-2's "System role not supported"
            raise InputError(f"{ex.where}: the chat template refused this conversation: {first_line(e)}") from None
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    pairs, n_empty = [], 0
    for ex, prompt, chosen, rejected in zip(examples, ids[0::3], ids[1::3], ids[2::3]):
        if chosen[: len(prompt)] != prompt or rejected[: len(prompt)] != prompt:
            raise InputError(
                f"{ex.where}: the chat template renders the prompt differently with and without "
                "the reply, so completion tokens cannot be separated; use a model with a prefix-stable template"
            )
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        longer = max(len(chosen), len(rejected))
        if len(prompt) + longer > max_length:
            prompt = prompt[-max_prompt_length:]
        if len(prompt) + longer > max_length:
            chosen, rejected = chosen[: max_length - max_prompt_length], rejected[: max_length - max_prompt_length]
        if not chosen or not rejected:
            n_empty += 1
            continue
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs, n_empty


def collate(pairs: list[Pair], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """B pairs -> input_ids, attention_mask, completion_mask [2B, T]: chosen rows, then rejected, right-padded."""
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        attention_mask[row, :n] = 1
        completion_mask[row, len(prompt) : n] = 1
    return input_ids, attention_mask, completion_mask


# ---- log-probs ----


class PairLogps(NamedTuple):
    chosen: Tensor  # [B] summed log-probs of the completion tokens under the policy
    rejected: Tensor
    ref_chosen: Tensor | None  # [B] same under the reference; None for reference-free methods
    ref_rejected: Tensor | None
    chosen_len: Tensor  # [B] completion tokens, as float
    rejected_len: Tensor
    held_out: bool = False  # held-out pairs (evaluation): a loss with state (gammapo.py) leaves it untouched


def _logits_into(buffer: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """lm_head on a chunk of hidden states, written into a reused fp32 buffer [chunk, V]."""
    if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=buffer)
        return buffer.add_(bias) if bias is not None else buffer
    return buffer.copy_(F.linear(hidden, weight, bias))  # bf16 matmul, fp32 log-softmax


class ChunkedTokenLogps(torch.autograd.Function):
    """log p(label) [K] for hidden states [K, H] through lm_head, chunk_size rows at a time, never holding [K, V].

    Forward keeps only the [K] log-sum-exp; backward recomputes each chunk's logits and turns them in place into
    g · (onehot - softmax). Both reuse one fp32 buffer: fresh [chunk, V] tensors per chunk (as activation
    checkpointing allocates them) come from mmap on CPU, and their page faults cost a third of a training step.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_size: int) -> Tensor:
        n_tokens = hidden.shape[0]
        token_logps = hidden.new_empty(n_tokens, dtype=torch.float32)
        log_z = hidden.new_empty(n_tokens, dtype=torch.float32)
        buffer = hidden.new_empty(min(n_tokens, chunk_size), weight.shape[0], dtype=torch.float32)
        for start in range(0, n_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            logits = _logits_into(buffer[: len(h)], h, weight, bias)
            target = logits.gather(-1, labels[rows, None]).squeeze(-1)
            peak = logits.amax(-1)
            log_z[rows] = peak + logits.sub_(peak[:, None]).exp_().sum(-1).log()
            token_logps[rows] = target - log_z[rows]
        ctx.save_for_backward(hidden, weight, bias, labels, log_z)
        ctx.chunk_size = chunk_size
        return token_logps

    @staticmethod
    def backward(ctx, grad_logps: Tensor):
        hidden, weight, bias, labels, log_z = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        buffer = hidden.new_empty(min(len(hidden), ctx.chunk_size), weight.shape[0], dtype=torch.float32)
        grad_logps = grad_logps.float()
        for start in range(0, len(hidden), ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h, g = hidden[rows], grad_logps[rows]
            grad_logits = _logits_into(buffer[: len(h)], h, weight, bias)
            grad_logits.sub_(log_z[rows, None]).exp_().mul_(-g[:, None])  # -g · softmax
            grad_logits.scatter_add_(-1, labels[rows, None], g[:, None])  # + g at the label
            if need_hidden:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if need_bias:
                grad_bias += grad_logits.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def batch_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens [N] and their count [N], without the [N, T, V] logits.

    The backbone runs once; only hidden states at positions that predict a completion token go
    through lm_head, chunk_size at a time, and each chunk's logits are recomputed in backward.
    """
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        # Right padding only: causal attention never lets a real token see the pads, so no mask
        # is needed and SDPA can take its causal fast path.
        hidden = model.base_model(input_ids=input_ids).last_hidden_state  # [N, T, H]
    else:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
    targets = completion_mask[:, 1:].bool()  # token t is predicted by the hidden state at t - 1
    row_of_target = targets.nonzero()[:, 0]  # [K]
    hidden = hidden[:, :-1][targets]  # [K, H]
    labels = input_ids[:, 1:][targets]  # [K]
    head = model.get_output_embeddings()
    token_logps = ChunkedTokenLogps.apply(hidden, head.weight, head.bias, labels, chunk_size)  # [K]
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, row_of_target, token_logps)
    return sums, targets.sum(-1).float()


class LogpsModel(nn.Module):
    """The policy as the loop sees it. One forward returns the completion log-probs, so that FSDP's
    root hooks (which gather embeddings, final norm and lm_head) wrap the whole pass."""

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
        return batch_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size)


# ---- distributed ----


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Without torchrun, a one-process group, so there is one code path.
    LOCAL_RANK picks the GPU on this node; RANK (dist.get_rank()) says who writes files: only rank 0."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None
    device = device or torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def on_rank0(fn: Callable, *args):
    """fn(*args) on rank 0 only (file writes, folder moves); every rank returns its result or raises its error, so
    no rank is left waiting in a collective."""
    out = [None]
    if dist.get_rank() == 0:
        try:
            out = [(fn(*args), None)]
        except Exception as e:
            out = [(None, e)]
    dist.broadcast_object_list(out, src=0)
    result, error = out[0]
    if error is not None:
        raise error
    return result


def shard_model(model: nn.Module, args: TrainArgs, device: torch.device) -> LogpsModel:
    """FSDP2: each decoder layer, then the root; bf16 compute over fp32 master weights when --precision asks."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = uses_bf16(args, device)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    policy = LogpsModel(model, args.logps_chunk_size)
    full_state = policy.state_dict() if dist.get_rank() == 0 else {}
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    if dist.get_world_size() > 1:  # the other ranks hold empty (meta) shards: rank 0 sends the weights
        if dist.get_rank() != 0:
            policy.to_empty(device=device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(policy, full_state, options=options)
        for buffer in policy.buffers():  # e.g. rotary frequencies, which no state dict carries
            dist.broadcast(buffer, src=0)
    return policy.to(device)


def gather(value) -> list:
    """A small Python value from every rank, in rank order."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(tensor: Tensor) -> Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: bool, device) -> bool:
    """Whether flag holds on every rank."""
    flags = torch.tensor(float(flag), device=device)  # NCCL reduces only GPU tensors
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return bool(flags.item())


# ---- the output folder ----
# One run at a time: rank 0 holds an exclusive lock on output_dir/.lock for the life of the run (the OS releases it
# when the process dies) and writes a token into it that every other rank must read back, which proves they all
# see the same folder (on more than one node it must be on a shared file system).

LOCK_FILE = ".lock"


def claim_output_dir(output_dir: Path) -> tuple[int, str]:
    """Rank 0: (the locked file descriptor, the run's token); a clear error when the folder is unusable or busy."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir} is a file, not a folder; pick another --output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(
            f"--output_dir {output_dir} is not writable ({e.strerror}); pick a folder you can write"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").split("\n")[0]
        os.close(fd)
        raise InputError(
            f"{output_dir} is in use by another run ({holder}); wait for it or pick another --output_dir"
        ) from None
    token = secrets.token_hex(8)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n{token}\n".encode(), 0)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        raise InputError(
            f"--output_dir {output_dir} is not writable ({e.strerror}); pick a folder you can write"
        ) from None
    return fd, token


def check_same_folder(output_dir: Path, token: str) -> None:
    """Every rank reads rank 0's token back from the lock file: one line naming the ranks that cannot."""
    try:
        seen = (output_dir / LOCK_FILE).read_text().split("\n")[1]
    except (OSError, IndexError):
        seen = None
    views = gather((seen == token, socket.gethostname()))
    blind = [f"rank {rank} on {host}" for rank, (sees, host) in enumerate(views) if not sees]
    if blind:
        raise InputError(
            f"{', '.join(blind)} cannot see --output_dir {output_dir} as rank 0 does: with more than one node, "
            "--output_dir and --ref_cache_dir must be on a file system every node shares"
        )


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value) -> None:
    """Atomic: a kill leaves the old file or the new one, never half of one. Strict JSON (no NaN)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def check_trackers(names) -> None:
    """Before any work: a tracker whose package is missing is one line saying what to install."""
    for name in names:
        if importlib.util.find_spec(name) is None:  # each tracker's package has its name
            raise InputError(f"--report_to {name} needs the {name} package: pip install {name}")


class Trackers:
    """--report_to: rank 0 sends each record of metrics.jsonl, as it is written, to every tracker asked for.
    metrics.jsonl stays the source of truth; a resumed run continues the same tracker run (TensorBoard drops the
    steps after the checkpoint, which are logged again)."""

    def __init__(self, names, output_dir: Path, record: dict, start_step: int):
        self.log_fns, self.close_fns = [], []
        if dist.get_rank() != 0:
            return
        name = f"{output_dir.name}-{record['run_id']}"
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

            def add_scalars(step, values):
                for key, value in values.items():
                    writer.add_scalar(key, value, step)

            self.log_fns.append(add_scalars)
            self.close_fns.append(writer.close)
        if "wandb" in names:
            import wandb

            run = wandb.init(project="minpo", name=name, id=record["run_id"], resume="allow", config=record)
            self.log_fns.append(lambda step, values: run.log(values, step=step))
            self.close_fns.append(run.finish)
        if "trackio" in names:
            import trackio

            trackio.init(project="minpo", name=name, config=record, resume="allow")
            self.log_fns.append(lambda step, values: trackio.log(values, step=step))
            self.close_fns.append(trackio.finish)

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step"}
        for log_fn in self.log_fns:
            log_fn(record["step"], values)

    def close(self) -> None:
        for close_fn in self.close_fns:
            close_fn()


def changed_flag(saved: dict, args: TrainArgs, method: str) -> str | None:
    """The first flag a resumed run would change that shapes the result, described; None if there is none."""
    if saved.get("method", method) != method:
        return f"the run was started by {saved['method']}.py, not {method}.py"
    for name, value in asdict(args).items():
        if name not in RESUME_MAY_CHANGE and name in saved and saved[name] != value:
            return f"--{name} is {saved[name]!r} in the run to resume, {value!r} now"
    return None


def read_metrics(path: Path, up_to_step: int) -> list[str]:
    """The lines of metrics.jsonl up to a step; a half-written last line (a kill during its write) is dropped."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for line_no, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_no < len(lines):
                raise InputError(
                    f"{path}: line {line_no} is not valid JSON; fix or delete the line, then rerun"
                ) from None
            log(f"warning: {path}: dropped its last line, which a kill left half-written")
            continue
        if record["step"] <= up_to_step:
            kept.append(line)
    return kept


# ---- reference log-probs ----


def all_pairs_logps(policy: LogpsModel, pairs: list[Pair], batch_size: int, pad_id: int, device, desc: str) -> Tensor:
    """Policy log-probs for all pairs, no grad, each rank doing every world-th batch: [N, 4] =
    (chosen, rejected, chosen_len, rejected_len), summed over ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    by_length = sorted(range(len(pairs)), key=lambda i: pairs[i].length)  # little padding per batch
    batches = [by_length[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    out = torch.zeros(len(pairs), 4, device=device)
    policy.eval()
    with torch.no_grad():
        n_slots = -(-len(batches) // world) * world
        for k in tqdm(range(rank, n_slots, world), desc=desc, disable=rank != 0, leave=False):
            # Every rank runs the same number of forwards: FSDP all-gathers need all of them.
            batch = batches[k] if k < len(batches) else batches[0][:1]
            logps, lens = policy(*(t.to(device) for t in collate([pairs[i] for i in batch], pad_id)))
            if k < len(batches):
                b = len(batch)
                out[batch] = torch.stack([logps[:b], logps[b:], lens[:b], lens[b:]], -1)
    policy.reshard()  # a root forward without backward leaves its unsharded weights registered
    policy.train()
    return all_reduce_sum(out)


def initial_weights_id(args: TrainArgs) -> str:
    """What names the initial weights: the seed for the random tiny model; for a local folder its resolved path
    and its weight files' sizes and times, so a folder trained again gets a new reference; for a hub name the
    commit the loader resolves, so a model pushed again under the same name gets a new reference too."""
    if args.model == "tiny":
        return f"tiny|seed {args.seed}"
    folder = Path(args.model).expanduser()
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        return str(folder.resolve()) + "".join(f"|{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in files)
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    try:
        revision = extract_commit_hash(cached_file(args.model, "config.json"), None)
    except OSError:
        revision = None
    return f"{args.model}@{revision or 'unresolved'}"


def ref_cache_key(weights_id: str, compute_dtype: str, pairs: list[Pair]) -> str:
    """Reference log-probs depend on the initial weights, their precision and the exact tokens (template,
    lengths, data)."""
    digest = hashlib.sha256(f"{weights_id}|{compute_dtype}".encode())
    for pair in pairs:
        for ids in pair:
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:24]


def read_ref_cache(cache_file: Path, n_pairs: int, device) -> Tensor | None:
    """The cached [N, 2] log-probs, or None; a truncated, corrupt or wrong-shape file is reported and ignored."""
    if not cache_file.is_file():
        return None
    try:
        ref = torch.load(cache_file, map_location=device, weights_only=True)
    except Exception as e:  # truncated or corrupt: torch raises several types
        problem = f"unreadable ({first_line(e)})"
    else:
        if (
            isinstance(ref, Tensor)
            and ref.shape == (n_pairs, 2)
            and ref.dtype == torch.float32
            and ref.isfinite().all()
        ):
            return ref
        problem = "not the [pairs, 2] finite float32 tensor expected"
    log(f"warning: reference cache {cache_file} is {problem}: computing it again")
    return None


def write_ref_cache(cache_file: Path, ref: Tensor) -> bool:
    """Rank 0. The cache only saves time: if it cannot be written, say so and go on; never leave a temporary file."""
    tmp = cache_file.with_name(f"{cache_file.name}.tmp{os.getpid()}")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ref.cpu(), tmp)
        os.replace(tmp, cache_file)
        return True
    except (OSError, RuntimeError) as e:  # torch.save on a full disk raises RuntimeError
        reason = "the disk is full" if disk_full(e, cache_file.parent) else first_line(e)
        log(f"warning: could not cache reference log-probs in {cache_file.parent} ({reason}); going on without it")
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False


def reference_logps(policy: LogpsModel, pairs: list[Pair], args: TrainArgs, pad_id: int, device, name: str) -> Tensor:
    """[N, 2] reference (chosen, rejected) log-probs: the model at its initial weights, computed once and
    cached on disk, so training holds one model and every method reuses the same numbers."""
    compute_dtype = "bf16" if uses_bf16(args, device) else "fp32"
    cache_dir = Path(args.ref_cache_dir).expanduser()
    cache_file = cache_dir / f"{ref_cache_key(initial_weights_id(args), compute_dtype, pairs)}.pt"
    cached = read_ref_cache(cache_file, len(pairs), device)
    if all_true(cached is not None, device):  # every rank must agree, or some would wait in forwards
        log(f"reference log-probs ({name}): reusing cache {cache_file}")
        return cached
    ref = all_pairs_logps(policy, pairs, 2 * args.micro_batch_size, pad_id, device, f"reference ({name})")[:, :2]
    cached_in = f", cached in {cache_file}" if on_rank0(write_ref_cache, cache_file, ref) else ""
    log(f"reference log-probs ({name}): computed {len(pairs)} pairs{cached_in}")
    return ref


# ---- checkpoints ----
# output_dir/checkpoint is the one to resume from. A new one is written as checkpoint.tmp, sealed by its manifest
# (each file's size and SHA-256, written last), then swapped in: checkpoint -> checkpoint.old, checkpoint.tmp ->
# checkpoint, checkpoint.old removed. A folder is renamed to *.deleting before it is deleted. So a kill at any instant
# leaves folders that recover_checkpoints() finishes or undoes at the next start, and --resume finds a damaged file
# by the manifest before loading it.

CHECKPOINT, TMP, OLD, MANIFEST = "checkpoint", "checkpoint.tmp", "checkpoint.old", "manifest.json"


class StepFailed(Exception):
    """A step could not finish (a failed write); the loop says which checkpoint is kept and stops."""


class NonFinite(StepFailed):
    """A loss, gradient norm, metric or weight is NaN or infinite."""


def remove(folder: Path) -> None:
    """Rename, then delete: a half-deleted folder never keeps a name that means something."""
    doomed = folder.with_name(folder.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    if folder.exists():
        os.replace(folder, doomed)
        shutil.rmtree(doomed)


def swap_in(output_dir: Path) -> None:
    """checkpoint.tmp (sealed) becomes checkpoint. Killed at any step, the whole swap can simply run again."""
    final, tmp, old = output_dir / CHECKPOINT, output_dir / TMP, output_dir / OLD
    if final.exists():
        remove(old)
        os.replace(final, old)
    os.replace(tmp, final)
    remove(old)


def sealed(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def recover_checkpoints(output_dir: Path) -> list[Path]:
    """Rank 0, at start: finish or undo what a kill interrupted. Returns the sealed checkpoints, newest first."""
    final, tmp, old = output_dir / CHECKPOINT, output_dir / TMP, output_dir / OLD
    for leftover in output_dir.glob("*.deleting"):
        shutil.rmtree(leftover)
    if sealed(tmp):  # killed after sealing, during the swap: it is the newest
        swap_in(output_dir)
    elif tmp.exists():  # killed while writing
        remove(tmp)
    if old.exists() and not final.exists():
        os.replace(old, final)
    return [path for path in (final, old) if sealed(path)]


def file_digest(path: Path) -> list:
    with path.open("rb") as f:
        return [os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()]


def my_share(names) -> list:
    """This rank's part of a list that every rank holds: hashing is spread over the ranks."""
    return sorted(names)[dist.get_rank() :: dist.get_world_size()]


def seal(folder: Path, files: set[str]) -> None:
    """Each rank hashes its share of the files; rank 0 writes the manifest, which makes the checkpoint whole."""
    shares = gather({name: file_digest(folder / name) for name in my_share(files)})
    on_rank0(write_json, folder / MANIFEST, {name: entry for share in shares for name, entry in share.items()})


def check_manifest(folder: Path) -> str | None:
    """What is wrong with a checkpoint (a file missing, truncated or altered), or None; each rank checks a share."""
    manifest = read_json(folder / MANIFEST)
    problems = [] if isinstance(manifest, dict) else [f"{folder / MANIFEST} is unreadable"]
    for name in my_share(manifest or {}):
        path, (size, sha256) = folder / name, manifest[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} is damaged ({path.stat().st_size} bytes, written with {size})")
        elif file_digest(path)[1] != sha256:
            problems.append(f"{path} is damaged (its SHA-256 is not the one it was written with)")
    return next((problem for share in gather(problems) for problem in share), None)


def rng_state() -> dict:
    """Every generator a step may draw from, as tensors and plain types: it loads with weights_only=True."""
    numpy = np.random.get_state(legacy=False)
    numpy["state"]["key"] = numpy["state"]["key"].tolist()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}
    return state | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    state["numpy"]["state"]["key"] = np.array(state["numpy"]["state"]["key"], dtype=np.uint32)
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def weights_are_finite(policy: nn.Module) -> bool:
    shards = [p.to_local() if hasattr(p, "to_local") else p for p in policy.parameters()]
    return all_true(bool(torch.stack([torch.isfinite(s).all() for s in shards]).all()), shards[0].device)


def save_checkpoint(output_dir: Path, policy, trainer: tuple, step: int, loss_state, record: dict) -> None:
    """Model and optimizer shards (torch.distributed.checkpoint), scheduler (trainer: the optimizer and scheduler),
    RNG, the loss's state and the run's flags (record, as args.json), written to checkpoint.tmp, sealed, then
    swapped in."""
    optimizer, scheduler = trainer
    if not weights_are_finite(policy):
        raise NonFinite("the weights hold NaN or infinite values, so no checkpoint was written")
    rank, world, tmp = dist.get_rank(), dist.get_world_size(), output_dir / TMP
    on_rank0(remove, tmp)
    error, files = None, {".metadata", "trainer.pt", "args.json"} | {f"rng_rank{r}.pt" for r in range(world)}
    try:
        model_state, optim_state = get_state_dict(policy, optimizer)
        metadata = dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        files |= {info.relative_path for info in metadata.storage_data.values()}
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            loss = loss_state.state_dict() if loss_state is not None else None
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "loss_state": loss}, tmp / "trainer.pt")
            write_json(tmp / "args.json", record)
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:  # e.g. a full disk
        error = write_failure("the checkpoint", tmp, e)
    errors = gather(error)
    if any(errors):
        on_rank0(remove, tmp)  # give the space back
        raise StepFailed(next(e for e in errors if e))
    seal(tmp, files)
    on_rank0(swap_in, output_dir)


def load_checkpoint(path: Path, policy, optimizer, scheduler, loss_state=None) -> int:
    """Loads a checkpoint whose files match its manifest; returns its step."""
    try:
        model_state, optim_state = get_state_dict(policy, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer = torch.load(path / "trainer.pt", weights_only=True)
        scheduler.load_state_dict(trainer["scheduler"])
        if loss_state is not None:
            loss_state.load_state_dict(trainer["loss_state"])
        rng_file = path / f"rng_rank{dist.get_rank()}.pt"
        if rng_file.is_file():  # absent when resumed on more processes than saved it
            set_rng_state(torch.load(rng_file, weights_only=True))
    except (Exception, dcp.api.CheckpointException) as e:
        raise InputError(f"could not load the checkpoint in {path}: {first_line(root_error(e))}") from None
    return trainer["step"]


def resume(checkpoints: list[Path], policy, optimizer, scheduler, loss_state) -> int:
    """The newest checkpoint whose files are whole; the step it was written at."""
    for path in checkpoints:
        problem = check_manifest(path)
        if problem is None:
            step = load_checkpoint(path, policy, optimizer, scheduler, loss_state)
            log(f"resumed from {path} at step {step}")
            return step
        log(f"warning: {problem}")
    raise InputError(f"{problem}; no whole checkpoint is left: put the file back, or start again in a new --output_dir")


def save_model(run: "Run") -> None:
    """A Hugging Face model folder that from_pretrained and vLLM load unchanged, in bf16 when the run computed in it."""
    output_dir, policy, tokenizer = run.output_dir, run.policy, run.tokenizer
    save_dtype = torch.bfloat16 if uses_bf16(run.args, run.device) else torch.float32
    if not weights_are_finite(policy):
        raise NonFinite("the weights hold NaN or infinite values, so the model was not saved")
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write():
        model = policy.model
        # Tied weights (lm_head = embeddings) come back from the gather as two tensors: keep the one name
        # from_pretrained expects, as an unsharded save_pretrained would.
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        state = {k.removeprefix("model."): v.to(save_dtype) for k, v in full.items()}
        state = {k: v for k, v in state.items() if k not in tied}
        model.config.use_cache = True
        try:
            model.save_pretrained(output_dir, state_dict=state)
            model.config.dtype = save_dtype  # save_pretrained wrote the dtype of the fp32 master weights
            model.config.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
        except (OSError, RuntimeError) as e:
            raise StepFailed(write_failure("the model", output_dir, e)) from None

    on_rank0(write)


def root_error(error: BaseException) -> BaseException:
    """The first rank's own exception inside torch.distributed.checkpoint's CheckpointException."""
    failures = getattr(error, "failures", None)
    return next(iter(failures.values()))[0] if failures else error


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a write failed for lack of space: ENOSPC or EDQUOT in the chain, or (torch's zip writer drops the
    errno: "unexpected pos") less than a MiB left."""
    seen = root_error(error)
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def write_failure(what: str, folder: Path, error: BaseException) -> str:
    reason = first_line(root_error(error))
    if disk_full(error, folder):
        reason = f"the disk is full ({reason})"
    elif "unexpected pos" in reason:  # torch's zip writer on a short write, errno lost
        reason = f"a write was cut short, as by a full disk, a quota or a file-size limit ({reason})"
    return f"could not write {what} in {folder}: {reason}"


# ---- training loop ----


def cosine_with_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def step_batches(pairs: list[Pair], args: TrainArgs, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded shuffle, remainder dropped, each sorted by length so that
    micro-batches of neighbours waste little padding."""
    generator = torch.Generator().manual_seed(args.seed + epoch)
    order = torch.randperm(len(pairs), generator=generator).tolist()
    n_steps = len(pairs) // args.global_batch_size
    batches = [order[i * args.global_batch_size : (i + 1) * args.global_batch_size] for i in range(n_steps)]
    return [sorted(b, key=lambda i: pairs[i].length) for b in batches]


def correct(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """[B] 1 where the chosen reward wins, 0.5 on a tie (policy = reference at step 0), else 0."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def evaluate(run: "Run") -> dict:
    """Held-out metrics. The method's own, by its reward (what TRL logs): reward accuracy, loss, margin. Then the
    same for every method, from π_0 = the initial model (run.initial): accuracy by log π/π_0 summed over the reply,
    accuracy by mean log-prob per token, and the mean log-prob per token of the chosen and rejected replies with its
    change since step 0."""
    out = all_pairs_logps(run.policy, run.test_pairs, 2 * run.args.micro_batch_size, run.pad_id, run.device, "held-out")
    chosen, rejected, chosen_len, rejected_len = out.unbind(1)
    initial = run.initial
    ref = (initial[:, 0], initial[:, 1]) if run.method.needs_reference else (None, None)
    lp = PairLogps(chosen, rejected, *ref, chosen_len, rejected_len, held_out=True)
    with torch.no_grad():
        losses, chosen_rewards, rejected_rewards = run.method.loss_fn(lp, run.args)
    per_token, initial_per_token = out[:, :2] / out[:, 2:], initial / out[:, 2:]  # [N, 2]
    return {
        "eval/reward_accuracy": correct(chosen_rewards, rejected_rewards).mean().item(),
        "eval/loss": losses.mean().item(),
        "eval/margin": (chosen_rewards - rejected_rewards).mean().item(),
        "eval/log_ratio_accuracy": correct(chosen - initial[:, 0], rejected - initial[:, 1]).mean().item(),
        "eval/avg_logp_accuracy": correct(per_token[:, 0], per_token[:, 1]).mean().item(),
        "eval/logp_per_token/chosen": per_token[:, 0].mean().item(),
        "eval/logp_per_token/rejected": per_token[:, 1].mean().item(),
        "eval/logp_per_token_change/chosen": (per_token[:, 0] - initial_per_token[:, 0]).mean().item(),
        "eval/logp_per_token_change/rejected": (per_token[:, 1] - initial_per_token[:, 1]).mean().item(),
    }


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def not_finite(record: dict) -> list[str]:
    return [name for name, value in record.items() if isinstance(value, float) and not math.isfinite(value)]


STEP_SUMS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"]
STEP_SUMS += ["logps/chosen", "logps/rejected", "tokens"]


def train_step(run: "Run", optimizer, scheduler, batch: list[int]) -> dict:
    """One optimizer step over this rank's share of the global batch (indices into run.train_pairs), in
    micro-batches; returns its metrics. A non-finite loss or gradient norm stops it before the weights change."""
    started, args, device = time.perf_counter(), run.args, run.device
    per_rank = args.global_batch_size // dist.get_world_size()
    n_micro = per_rank // args.micro_batch_size
    totals = torch.zeros(len(STEP_SUMS), device=device)  # on-device sums, reduced once per step
    for micro in range(n_micro):
        ids = batch[micro * args.micro_batch_size : (micro + 1) * args.micro_batch_size]
        input_ids, attention_mask, completion_mask = (
            t.to(device) for t in collate([run.train_pairs[i] for i in ids], run.pad_id)
        )
        run.policy.set_requires_gradient_sync(args.gradient_sync == "micro_batch" or micro == n_micro - 1)
        logps, lens = run.policy(input_ids, attention_mask, completion_mask)
        b, ref = len(ids), run.train_ref[ids] if run.train_ref is not None else None
        ref_logps = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
        lp = PairLogps(logps[:b], logps[b:], *ref_logps, lens[:b], lens[b:])
        losses, chosen_rewards, rejected_rewards = run.method.loss_fn(lp, args)
        (losses.sum() / per_rank).backward()  # FSDP averages over ranks: the mean over the global batch
        margins, wins = chosen_rewards - rejected_rewards, correct(chosen_rewards, rejected_rewards)
        sums = [losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(), wins.sum(), margins.sum()]
        totals += torch.stack(sums + [lp.chosen.detach().sum(), lp.rejected.detach().sum(), attention_mask.sum()])
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), args.max_grad_norm or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    totals = dict(zip(STEP_SUMS, all_reduce_sum(totals).tolist()))
    tokens = totals.pop("tokens")
    record = {name: total / args.global_batch_size for name, total in totals.items()} | {"grad_norm": grad_norm.item()}
    bad = not_finite(record)
    if bad:
        optimizer.zero_grad(set_to_none=True)
        raise NonFinite(f"{bad[0]} is {record[bad[0]]}, so the weights were not updated")
    lr = scheduler.get_last_lr()[0]  # the rate this step uses; after scheduler.step() it is the next step's
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return record | {
        "lr": lr,
        "tokens": int(tokens),
        "tokens/s": tokens / seconds,
        "peak_memory_gb": peak_memory_gb(device),
    }


class StopSignal:
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) during training: finish the step, write a checkpoint,
    stop. A second signal, or one before the first step, stops at once. A repeat within DUPLICATE_S seconds is the
    same request: SLURM and a terminal signal every process, and torchrun forwards the signal to its workers again."""

    DUPLICATE_S = 3.0

    def __init__(self):
        self.received, self.received_at, self.in_loop, self.previous = None, 0.0, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        name, rank0 = signal.Signals(signum).name, int(os.environ.get("RANK", "0")) == 0
        if self.received is not None and time.monotonic() - self.received_at < self.DUPLICATE_S:
            return
        if self.received is not None or not self.in_loop:
            if rank0:
                print(f"[minpo] {name}: stopped at once; --resume continues from the last checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.received, self.received_at = signum, time.monotonic()
        if rank0:
            print(
                f"[minpo] {name}: finishing this step, then writing a checkpoint (again: stop at once)", file=sys.stderr
            )


# ---- the run ----
# train() is the whole run, in the order it happens: flags and folder checked, then start_run (data, model,
# reference log-probs), then run_steps (optimizer, resume, steps with held-out metrics and checkpoints, save).


class LossState(Protocol):
    """What a loss keeps between steps (gammapo.py's history of reward gaps; every other loss keeps nothing)."""

    def reset(self, seed: int) -> None: ...  # at the start of a run
    def state_dict(self) -> dict: ...  # saved in every checkpoint
    def load_state_dict(self, state: dict) -> None: ...
    def metrics(self) -> dict: ...  # floats about the step just taken, logged with it


class Method(NamedTuple):
    """What a method file hands to common.main."""

    name: str  # the file's name: dpo, simpo, ...
    loss_fn: Callable  # (PairLogps, args) -> (losses, chosen rewards, rejected rewards), each [B]
    needs_reference: bool
    loss_state: LossState | None


@dataclass(frozen=True)
class Run:
    """What every step reads, set once by start_run."""

    args: TrainArgs
    method: Method
    output_dir: Path
    device: torch.device
    policy: LogpsModel
    tokenizer: object
    train_pairs: list[Pair]
    test_pairs: list[Pair]
    train_ref: Tensor | None  # [N, 2] reference log-probs of the training pairs; None for reference-free methods
    initial: Tensor | None  # [M, 2] the initial model's held-out log-probs (π_0 of the common held-out metrics)
    record: dict  # args.json

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def train(args: TrainArgs, loss_fn, needs_reference: bool, method: str, loss_state: LossState | None = None) -> dict:
    """The whole run. Returns the last metrics (held-out ones included)."""
    rank, world, device = setup_distributed()
    lock = None
    try:
        with StopSignal() as stop:
            check_args(args, world)
            check_trackers(args.report_to)
            output_dir = Path(args.output_dir or f"ckpt/{method}")
            lock, token = on_rank0(claim_output_dir, output_dir)
            check_same_folder(output_dir, token)
            how, checkpoints = on_rank0(plan_start, output_dir, args, method)
            if how == "complete":
                log(f"{output_dir} holds the finished run: nothing to do")
                return json.loads(read_metrics(output_dir / "metrics.jsonl", math.inf)[-1])
            run = start_run(args, Method(method, loss_fn, needs_reference, loss_state), output_dir, device, how)
            return run_steps(run, checkpoints, stop)
    finally:
        if lock is not None and rank == 0:
            os.close(lock)
        dist.destroy_process_group()


def run_record(args: TrainArgs, method: str, **more) -> dict:
    """args.json: the run's flags and method, then what the run adds (RUN_KEYS)."""
    return asdict(args) | {"method": method} | more


RUN_KEYS = ("method", "run_id", "command", "paper", "train_rows", "held_out_pairs", "completed_steps", "hardware")
RUN_KEYS += ("reply_score",)


def command(method: str) -> str:
    """The command that started the run, as one would type it again (torchrun's flags rebuilt from its environment)."""
    if Path(sys.argv[0]).stem != method:  # called from Python (tests, benchmarks): there is no command line
        return f"{method}.py, called from Python"
    line = shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return line
    nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
    launcher = f"torchrun {f'--nnodes {nodes} ' if nodes > 1 else ''}--nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}"
    return line.replace("python", launcher, 1)


def plan_start(output_dir: Path, args: TrainArgs, method: str) -> tuple[str, list[Path]]:
    """Rank 0, holding the folder's lock: 'fresh', 'resume' (with the sealed checkpoints, newest first) or 'complete'
    (the run already finished); one line when the folder holds something this command must not overwrite."""
    checkpoints = recover_checkpoints(output_dir)
    saved = read_json(checkpoints[0] / "args.json") if checkpoints else read_json(output_dir / "args.json")
    finished = isinstance(saved, dict) and "completed_steps" in saved
    if not args.resume:
        if checkpoints:
            raise InputError(
                f"{output_dir} already holds a checkpoint: pass --resume to continue it, or pick another --output_dir"
            )
        if finished:
            log(f"warning: {output_dir} holds a finished run ({saved['completed_steps']} steps): training it again")
        write_json(
            output_dir / "args.json", run_record(args, method, run_id=secrets.token_hex(4), command=command(method))
        )
        return "fresh", []
    if not isinstance(saved, dict):
        raise InputError(f"--resume: no checkpoint in {output_dir}; run without --resume to start fresh")
    problem = changed_flag(saved, args, method)
    if problem:
        raise InputError(f"--resume: {problem}; a resumed run keeps the flags that shape its result")
    if finished:
        for path in checkpoints:  # a kill after the model was saved, before its checkpoint was removed
            remove(path)
        return "complete", []
    if not checkpoints:
        log(f"--resume: no checkpoint in {output_dir} yet (the run stopped before its first one): starting at step 0")
    return ("resume" if checkpoints else "fresh"), checkpoints


def start_run(args: TrainArgs, method: Method, output_dir: Path, device: torch.device, how: str) -> Run:
    """Data, model and reference log-probs: what every step reads. Also args.json, which a fresh run completes with
    what it read."""
    torch.manual_seed(args.seed)
    if method.loss_state is not None:
        method.loss_state.reset(args.seed)
    tokenizer = load_tokenizer(args.model)
    train_pairs, test_pairs, train_counts = prepare_data(args, tokenizer)
    started = read_json(output_dir / "args.json") or {}  # as plan_start wrote it when the run began
    paper = "; ".join((sys.modules[method.loss_fn.__module__].__doc__ or method.name).strip().splitlines()[:2])
    record = run_record(args, method.name, **{k: started.get(k) for k in ("run_id", "command")}, paper=paper)
    record |= {"train_rows": train_counts, "held_out_pairs": len(test_pairs)}
    if how == "fresh":
        on_rank0(write_json, output_dir / "args.json", record)
    model = load_model(args.model, tokenizer, torch.float32, args.seed, empty=dist.get_rank() != 0)
    policy = shard_model(model, args, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Before any checkpoint is loaded: the reference is the initial model. Every method gets the held-out
    # pairs' (π_0 of the common held-out metrics); only a method with a reference gets the training pairs'.
    train_ref = reference_logps(policy, train_pairs, args, pad_id, device, "train") if method.needs_reference else None
    initial = reference_logps(policy, test_pairs, args, pad_id, device, "held-out") if test_pairs else None
    return Run(args, method, output_dir, device, policy, tokenizer, train_pairs, test_pairs, train_ref, initial, record)


def prepare_data(args: TrainArgs, tokenizer) -> tuple[list[Pair], list[Pair], dict]:
    """(training pairs, held-out pairs, row counts for args.json), tokenized, every row checked before any work."""
    train_rows, train_source, test_rows, test_source = load_data(args)
    overlap = held_out_in_training(train_rows, test_rows)
    if overlap:
        log(
            f"warning: {overlap} of {len(test_rows)} held-out pairs also appear in the training data; "
            "held-out metrics will look better than they are"
        )
    train_rows, counts = select_and_flip(train_rows, args.select_frac, args.flip_frac, args.seed)
    if "kept" in counts:
        log(f"--select_frac {args.select_frac}: kept {counts['kept']} of {counts['loaded']} training pairs")
    if "flipped" in counts:
        log(
            f"--flip_frac {args.flip_frac}: swapped chosen and rejected in {counts['flipped']} of "
            f"{len(train_rows)} training pairs (seed {args.seed})"
        )
    train_pairs, train_empty = tokenize_pairs(train_rows, tokenizer, args.max_length, args.max_prompt_length)
    test_pairs, test_empty = tokenize_pairs(test_rows, tokenizer, args.max_length, args.max_prompt_length)
    if train_empty or test_empty:
        log(f"dropped {train_empty} training and {test_empty} held-out pairs left with no completion after truncation")
        counts["dropped"] = train_empty
    if len(train_pairs) < args.global_batch_size:
        raise InputError(
            f"{train_source}: {len(train_pairs)} usable pairs, fewer than one "
            f"--global_batch_size {args.global_batch_size}"
        )
    return train_pairs, test_pairs, counts


class MetricsLog:
    """metrics.jsonl, one line per step, written by rank 0 and sent to the --report_to trackers. A resumed run first
    drops the lines after its checkpoint's step, which it will write again."""

    def __init__(self, run: Run, start_step: int):
        self.path, self.rank0 = run.output_dir / "metrics.jsonl", dist.get_rank() == 0
        kept = read_metrics(self.path, start_step) if start_step else []
        on_rank0(self.path.write_text, "".join(line + "\n" for line in kept))
        self.trackers = Trackers(run.args.report_to, run.output_dir, run.record, start_step)

    def write(self, record: dict) -> None:
        if self.rank0:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            self.trackers.log(record)


def run_steps(run: Run, checkpoints: list[Path], stop: StopSignal) -> dict:
    """Optimizer, resume, the steps, the saved model. Returns the last metrics."""
    args, world, rank = run.args, dist.get_world_size(), dist.get_rank()
    steps_per_epoch = len(run.train_pairs) // args.global_batch_size
    total_steps = steps_per_epoch * args.num_epochs
    fused = run.device.type == "cuda"  # one kernel for the whole update on GPU
    optimizer = torch.optim.AdamW(
        run.policy.parameters(), args.learning_rate, weight_decay=args.weight_decay, fused=fused
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, args.warmup_ratio))
    start_step = resume(checkpoints, run.policy, optimizer, scheduler, run.method.loss_state) if checkpoints else 0
    metrics = MetricsLog(run, start_step)
    log(
        f"{run.method.name}: {len(run.train_pairs)} pairs, {total_steps} steps of {args.global_batch_size} "
        f"({world} x {args.global_batch_size // world // args.micro_batch_size} x {args.micro_batch_size}), "
        f"{len(run.test_pairs)} held-out pairs, on {run.device.type}"
    )
    first = evaluate_at_start(run, metrics) if run.test_pairs and start_step == 0 else {}
    result, last_saved, step = first, (start_step or None), start_step
    stop.in_loop = True
    try:
        bar = tqdm(total=total_steps, initial=start_step, desc=run.method.name, disable=rank != 0, dynamic_ncols=True)
        with bar:
            for step in range(start_step, total_steps):
                epoch, index = divmod(step, steps_per_epoch)
                if step == start_step or index == 0:
                    epoch_batches = step_batches(run.train_pairs, args, epoch)
                batch = epoch_batches[index][rank::world]  # rank r: every world-th pair by length
                result = {"step": step + 1, "epoch": epoch + (index + 1) / steps_per_epoch}
                result |= take_step(run, (optimizer, scheduler), batch, step + 1, total_steps)
                metrics.write(result)
                bar.set_postfix(loss=f"{result['loss']:.4f}", acc=f"{result['rewards/accuracy']:.2f}")
                bar.update()
                if checkpoint_now(run, stop, step + 1, total_steps, (optimizer, scheduler)):
                    last_saved = step + 1
        save_model(run)
    except StepFailed as e:
        raise RunStopped(f"step {step + 1}: {e}. {after_failure(e, step + 1, args, last_saved)}") from None
    finally:
        metrics.trackers.close()
    finish_run(run, total_steps, first, result)
    return result


def take_step(run: Run, trainer: tuple, batch: list[int], step: int, total_steps: int) -> dict:
    """Step number `step` (from 1) and its metrics: the step's own, the loss state's, held-out ones at the last step
    and every --eval_steps; any of them not finite stops the run."""
    result = train_step(run, *trainer, batch)
    result |= run.method.loss_state.metrics() if run.method.loss_state is not None else {}
    eval_steps = run.args.eval_steps
    if run.test_pairs and (step == total_steps or (eval_steps and step % eval_steps == 0)):
        result |= evaluate(run)
    bad = not_finite(result)
    if bad:
        raise NonFinite(f"{bad[0]} is {result[bad[0]]}")
    return result


def evaluate_at_start(run: Run, metrics: MetricsLog) -> dict:
    """Held-out metrics of the initial model: step 0 of metrics.jsonl."""
    result = evaluate(run)
    bad = not_finite(result)
    if bad:
        raise RunStopped(f"step 0: {bad[0]} is {result[bad[0]]}; check the loss's hyper-parameters and the data")
    metrics.write({"step": 0, **result})
    log(f"step 0: held-out reward accuracy {result['eval/reward_accuracy']:.3f}")
    return result


def checkpoint_now(run: Run, stop: StopSignal, step: int, total_steps: int, trainer: tuple) -> bool:
    """A checkpoint every --save_steps, and one on a stop signal, after which the run ends in one line."""
    args = run.args
    stopping = not all_true(stop.received is None, run.device) and step < total_steps
    if not (stopping or (args.save_steps and step % args.save_steps == 0 and step < total_steps)):
        return False
    save_checkpoint(run.output_dir, run.policy, trainer, step, run.method.loss_state, run.record)
    if stopping:
        signum = stop.received or signal.SIGTERM
        raise RunStopped(
            f"{signal.Signals(signum).name}: stopped after step {step} of {total_steps}, checkpoint saved in "
            f"{run.output_dir / CHECKPOINT}; to continue, run the same command with --resume",
            128 + signum,
        )
    return True


def after_failure(error: StepFailed, step: int, args: TrainArgs, last_saved: int | None) -> str:
    """What is kept and what to do, for the one line a failed step ends with."""
    kept = f"the checkpoint of step {last_saved} is kept" if last_saved else "no checkpoint was written"
    if not isinstance(error, NonFinite):
        return f"Nothing is lost: {kept}; make room, then run the same command with --resume"
    cause = (
        "the loss's hyper-parameters or the data (the initial weights already give it)"
        if step == 1
        else f"too high a learning rate (--learning_rate {args.learning_rate:g})"
    )
    return f"Nothing was saved from this step; {kept}. Likely cause: {cause}; start again with other flags"


def finish_run(run: Run, total_steps: int, first: dict, last: dict) -> None:
    """After the model is saved: the tiny task's reply score, args.json marked complete, the model card, the
    checkpoints dropped, and the run's summary in the log."""
    record = run.record
    if run.args.data == "tiny" and run.test_pairs:
        record["reply_score"] = on_rank0(score_tiny_replies, run.output_dir)
        log(f"generated-reply score {record['reply_score']:.3f} (0.5: ignores the request, 1: follows it)")
    device = run.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() + " CPU"
    record |= {"completed_steps": total_steps, "hardware": f"{dist.get_world_size()} x {gpu}"}

    def write():
        write_json(run.output_dir / "args.json", record)
        (run.output_dir / "README.md").write_text(model_card(run.output_dir))
        remove(run.output_dir / CHECKPOINT)
        remove(run.output_dir / OLD)

    on_rank0(write)
    if "eval/reward_accuracy" in last:
        start = f"{first['eval/reward_accuracy']:.3f} -> " if first else ""
        log(f"held-out reward accuracy {start}{last['eval/reward_accuracy']:.3f}")
    log(f"model saved to {run.output_dir}")


def score_tiny_replies(output_dir: Path) -> float:
    """The tiny task's generated-reply score (eval.py) of the saved model; its replies go to replies.jsonl."""
    from eval import tiny_reply_score  # eval.py imports this file

    rows = [json.loads(line) for line in (TINY_DATA_DIR / "test.jsonl").read_text().splitlines()]
    score, replies = tiny_reply_score(str(output_dir), [row["prompt"] for row in rows])
    (output_dir / "replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in replies))
    return score


def model_card(output_dir: Path) -> str:
    """The folder's README.md, as a person or the hub shows it, made from args.json and metrics.jsonl alone."""
    run = read_json(output_dir / "args.json")
    records = [json.loads(line) for line in read_metrics(output_dir / "metrics.jsonl", math.inf)]
    folder = run["output_dir"] or f"ckpt/{run['method']}"  # as the command named it
    steps, evals = [r for r in records if "loss" in r], [r for r in records if "eval/reward_accuracy" in r]
    tokens = sum(r["tokens"] for r in steps)
    seconds = sum(r["tokens"] / r["tokens/s"] for r in steps)
    on_hub = run["model"] != "tiny" and not Path(run["model"]).expanduser().exists()
    header = [
        "---",
        "library_name: transformers",
        "tags:",
        "- minpo",
        f"- {run['method']}",
        "- preference-optimization",
    ]
    header += [f"base_model: {run['model']}"] if on_hub else []
    header += ["datasets:", f"- {run['data']}"] if "/" in run["data"] and not Path(run["data"]).exists() else []
    rows = run["train_rows"]
    data = f"{rows['loaded']} training pairs read from `{run['data']}`"
    data += f", {rows['kept']} kept by `--select_frac`" if "kept" in rows else ""
    data += f", {rows['flipped']} with chosen and rejected swapped by `--flip_frac`" if "flipped" in rows else ""
    data += f", {rows['dropped']} dropped (no completion left after truncation)" if "dropped" in rows else ""
    held_out = [
        "| held-out | " + " | ".join(f"step {r['step']}" for r in (evals[0], evals[-1])) + " |",
        "|---|---:|---:|",
    ]
    common = ("log_ratio_accuracy", "avg_logp_accuracy", "logp_per_token/chosen", "logp_per_token/rejected")
    for key in ("reward_accuracy", "loss", "margin", *common):
        name = key.replace("_", " ").replace("/", ", ")
        held_out.append(f"| {name} | {evals[0]['eval/' + key]:.4f} | {evals[-1]['eval/' + key]:.4f} |")
    if "reply_score" in run:
        held_out += ["", f"Generated-reply score on the tiny task: {run['reply_score']:.3f} (0.5 ignores the request)."]
    flags = [f"| `--{k}` | `{v}` |" for k, v in run.items() if k not in RUN_KEYS]
    return "\n".join(
        [*header, "---", "", f"# {Path(folder).name}", ""]
        + [f"`{run['model']}` trained with minpo's `{run['method']}.py`: {run['paper']}", "", "```bash"]
        + [run["command"], "```", "", *(held_out if evals else ["No held-out pairs."]), ""]
        + [f"{len(steps)} optimizer steps of {run['global_batch_size']} pairs ({run['num_epochs']} epochs), "]
        + [f"{tokens:,} tokens in {seconds:.0f} s of training steps, on {run['hardware']}.", "", "## Data", ""]
        + [f"{data}; {run['held_out_pairs']} held-out pairs.", "", "## Hyper-parameters", ""]
        + ["| flag | value |", "|---|---|", *flags, "", "## Score it on AlpacaEval 2", "", "```bash"]
        + [f"python eval.py {folder}", "```", ""]
    )


def main(args_cls: type[TrainArgs], loss_fn, needs_reference: bool, loss_state=None) -> None:
    """Entry point of every method file: parse flags, train, and end a bad input or a stop in one line."""
    method = Path(inspect.getfile(loss_fn)).stem
    args = parse_args(args_cls)
    try:
        train(args, loss_fn, needs_reference, method, loss_state)
    except (InputError, RunStopped) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{method}: {'error' if isinstance(e, InputError) else 'stopped'}: {e}", file=sys.stderr)
        sys.exit(e.exit_code if isinstance(e, RunStopped) else 2)


# ---- the embedded tiny run: --model tiny --data tiny ----

# A random model learns the tiny task in about 30 seconds on 2 CPU cores.
# Applied to --model tiny for every field not given on the command line.
TINY_DEFAULTS = dict(
    data="tiny",
    learning_rate=1e-3,
    global_batch_size=32,
    micro_batch_size=16,
    num_epochs=2,
    max_length=128,
    max_prompt_length=96,
    save_steps=50,
    gradient_checkpointing=False,
)

# Qwen-style ChatML, without Qwen's default system prompt.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges) with ChatML special tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, dtype=torch.float32):
    """A small random Qwen2 (head_dim 64, so vLLM's CPU backend can serve it too)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=320,  # 259 tokens, rounded up
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    return model
