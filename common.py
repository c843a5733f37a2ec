"""minpo common: everything the method files share, and nothing that differs between them.

Read top to bottom: arguments, model and tokenizer, data, log-probs, distributed setup,
reference log-probs, checkpoints, the training loop. Loss math, β/γ/α and method defaults
live in the method files (dpo.py, simpo.py, ...), never here.
"""

import contextlib
import hashlib
import inspect
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

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
    """Bad input from the user: printed as one line, no traceback."""


def first_line(error: Exception) -> str:
    """The gist of a library's (often multi-line) error, for a one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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
    """use only the first N training pairs"""
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
    """prompt + completion tokens; longer completions are cut"""
    max_prompt_length: int = 1800
    """prompt tokens kept (the last ones); must be < max_length"""
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
    """gradient clipping"""
    seed: int = 42
    """seed for data order and the tiny model"""
    bf16: bool = True
    """bf16 compute with fp32 master weights on GPU (CPU always runs fp32)"""
    gradient_checkpointing: bool = False
    """recompute decoder activations in backward: about one more forward, much less memory"""
    logps_chunk_size: int = 256
    """completion tokens per lm_head chunk (one chunk x vocabulary fp32 buffer); [N, T, V] never exists"""
    eval_steps: int = 0
    """also measure held-out reward accuracy every N steps (0: only at start and end)"""
    save_steps: int = 100
    """write a resumable checkpoint every N steps (0: never)"""
    resume: bool = False
    """continue from output_dir/checkpoint"""
    ref_cache_dir: str = "~/.cache/minpo/ref_logps"
    """where reference log-probs are cached, shared by every method"""


# The embedded tiny run: a random model learns the tiny task in about 30 seconds on 2 CPU cores.
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
)


def parse_args(args_cls: type[TrainArgs], argv: list[str] | None = None) -> TrainArgs:
    argv = sys.argv[1:] if argv is None else argv
    args = tyro.cli(args_cls, args=argv, use_underscores=True, description=sys.modules[args_cls.__module__].__doc__)
    if args.model == "tiny":
        given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        for name, value in TINY_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
    return args


def check_args(args: TrainArgs, world_size: int) -> None:
    for name in ("micro_batch_size", "global_batch_size", "num_epochs", "logps_chunk_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    if args.global_batch_size % (args.micro_batch_size * world_size):
        raise InputError(
            f"--global_batch_size {args.global_batch_size} is not a multiple of --micro_batch_size "
            f"{args.micro_batch_size} x {world_size} processes; pick sizes that divide"
        )
    if not 0 <= args.flip_frac < 1:
        raise InputError(f"--flip_frac {args.flip_frac} must be in [0, 1): the fraction of training labels to swap")
    if not 0 < args.select_frac <= 1:
        raise InputError(f"--select_frac {args.select_frac} must be in (0, 1]: the fraction of training pairs to keep")
    if args.max_prompt_length >= args.max_length:
        raise InputError(
            f"--max_prompt_length {args.max_prompt_length} must be smaller than --max_length {args.max_length}, "
            "or no completion token is left"
        )


# ---- model and tokenizer ----

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
        tokenizer = AutoTokenizer.from_pretrained(name)
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
            return build_tiny_model(tokenizer, seed, dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if empty:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name), dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:
        raise _cannot_load(name, e) from None


def load_model_and_tokenizer(name: str, dtype=torch.float32, seed: int = 0):
    """A hub name, a local folder, or 'tiny'. Never trust_remote_code."""
    tokenizer = load_tokenizer(name)
    return load_model(name, tokenizer, dtype, seed), tokenizer


# ---- data ----


def read_rows(path: Path) -> list[dict]:
    """Rows of a local .jsonl, .json or .parquet file, with the line named when JSON is broken."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
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
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise InputError(f"{path}: unknown data file type {path.suffix!r} (use .jsonl, .json or .parquet)")


def find_split_file(folder: Path, split: str) -> Path:
    for suffix in (".jsonl", ".json", ".parquet"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    raise InputError(f"{folder}: no {split}.jsonl, {split}.json or {split}.parquet in this folder")


def load_data(args: TrainArgs) -> tuple[list[dict], str, list[dict], str]:
    """(train rows, train source name, test rows, test source name)."""
    if args.data == "tiny" or Path(args.data).expanduser().is_dir():
        folder = TINY_DATA_DIR if args.data == "tiny" else Path(args.data).expanduser()
        train_file, test_file = find_split_file(folder, "train"), find_split_file(folder, "test")
        train, test = read_rows(train_file), read_rows(test_file)
        sources = str(train_file), str(test_file)
    elif args.data.endswith((".jsonl", ".json", ".parquet")):
        train, sources = read_rows(Path(args.data).expanduser()), (args.data, args.test_data)
        if args.test_data:
            test = read_rows(Path(args.test_data).expanduser())
        else:  # hold out 5% of the rows, seeded; check them first so errors name the file's own row numbers
            for row_no, row in enumerate(train, 1):
                parse_row(row, args.data, row_no)
            order = np.random.default_rng(args.seed).permutation(len(train))
            n_test = min(1000, max(1, len(train) // 20))
            test = [train[i] for i in sorted(order[:n_test])]
            train = [train[i] for i in sorted(order[n_test:])]
            sources = (f"{args.data} (train part)", f"{args.data} (held-out part)")
    else:
        from datasets import load_dataset

        try:
            train = load_dataset(args.data, split=args.train_split).to_list()
            test = load_dataset(args.data, split=args.test_split).to_list()
        except Exception as e:  # hub, network and split errors all end here
            raise InputError(
                f"could not load data set '{args.data}' ({type(e).__name__}: {first_line(e)}); "
                "pass a hub name, a local .jsonl/.json/.parquet file or folder, or 'tiny'"
            ) from None
        sources = f"{args.data}[{args.train_split}]", f"{args.data}[{args.test_split}]"
    train = train[: args.max_train_samples] if args.max_train_samples else train
    test = test[: args.max_test_samples] if args.max_test_samples else test
    return train, sources[0], test, sources[1]


def _reply(value, where: str) -> tuple[list[dict] | None, str]:
    """A chosen/rejected value -> (prompt messages before the reply or None, reply text)."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: empty reply")
        return None, value
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: expected a non-empty string or list of {{role, content}} messages")
    for k, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"{where}: message {k} needs a string 'role'")
        if not isinstance(message.get("content"), str):
            raise InputError(f"{where}: message {k} needs a string 'content'")
    if value[-1]["role"] != "assistant":
        raise InputError(f"{where}: the last message must be the assistant reply, got role '{value[-1]['role']}'")
    if not value[-1]["content"].strip():
        raise InputError(f"{where}: empty assistant reply")
    return [{"role": m["role"], "content": m["content"]} for m in value[:-1]], value[-1]["content"]


def parse_row(row, source: str, row_no: int) -> tuple[list[dict], str, str]:
    """One data row -> (prompt messages, chosen reply, rejected reply), or an error naming file, row and field."""
    where = f"{source}: row {row_no}"
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with prompt, chosen, rejected")
    for field in ("prompt", "chosen", "rejected"):
        if row.get(field) is None:
            raise InputError(f"{where}: field '{field}' is missing")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise InputError(f"{where}: field 'prompt' must be a non-empty string")
    chosen_prefix, chosen = _reply(row["chosen"], f"{where}: field 'chosen'")
    rejected_prefix, rejected = _reply(row["rejected"], f"{where}: field 'rejected'")
    if chosen_prefix and rejected_prefix is not None and chosen_prefix != rejected_prefix:
        raise InputError(f"{where}: fields 'chosen' and 'rejected' start from different conversations")
    prompt_messages = chosen_prefix or rejected_prefix or [{"role": "user", "content": row["prompt"]}]
    return prompt_messages, chosen, rejected


def score_gap(row: dict, source: str, row_no: int) -> float:
    where = f"{source}: row {row_no}"
    for field in ("score_chosen", "score_rejected"):
        value = row.get(field)
        if value is None:
            raise InputError(f"{where}: field '{field}' is missing; --select_frac ranks pairs by their score gap")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"{where}: field '{field}' must be a finite number, got {value!r}")
    return row["score_chosen"] - row["score_rejected"]


def select_and_flip(rows: list[dict], source: str, args: TrainArgs) -> tuple[list[dict], dict]:
    """--select_frac, then --flip_frac, on the training rows.

    Selection keeps the round(q x N) rows with the largest score gap (ties: the earlier row), in file order.
    Flipping swaps chosen and rejected in round(p x kept) rows drawn with --seed: the same rows on every
    rank and every resume. Returns the rows and the counts for the log and args.json.
    """
    counts = {"loaded": len(rows)}
    if args.select_frac < 1:
        gaps = []
        for row_no, row in enumerate(rows, 1):  # every row checked here: after selection, row numbers shift
            parse_row(row, source, row_no)
            gaps.append(score_gap(row, source, row_no))
        by_gap = sorted(range(len(rows)), key=lambda i: -gaps[i])  # stable: ties keep file order
        rows = [rows[i] for i in sorted(by_gap[: round(args.select_frac * len(rows))])]
        counts["kept"] = len(rows)
    if args.flip_frac > 0:
        flipped = np.random.default_rng([args.seed, 7]).choice(
            len(rows), round(args.flip_frac * len(rows)), replace=False
        )
        rows = list(rows)
        for i in flipped:
            rows[i] = rows[i] | {"chosen": rows[i]["rejected"], "rejected": rows[i]["chosen"]}
        counts["flipped"] = len(flipped)
    return rows, counts


class Pair(NamedTuple):
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion tokens only
    rejected_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def tokenize_pairs(rows: list[dict], source: str, tokenizer, args: TrainArgs) -> tuple[list[Pair], int]:
    """Rows -> token pairs with the model's chat template, and how many pairs truncation emptied.

    Prompt ids = template(prompt, add_generation_prompt=True); completion ids = template(prompt + reply)
    minus that prefix. No extra BOS/EOS: the template already has what the model expects.
    Truncation: keep the last max_prompt_length prompt tokens, then cut the completion to max_length.
    """
    parsed = [parse_row(row, source, i) for i, row in enumerate(rows, 1)]  # all rows checked before any work

    def ids(conversations, generation_prompt):
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt)
            for c in conversations
        ]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    prompts = ids([p for p, _, _ in parsed], True)
    chosen_full = ids([p + [{"role": "assistant", "content": c}] for p, c, _ in parsed], False)
    rejected_full = ids([p + [{"role": "assistant", "content": r}] for p, _, r in parsed], False)
    pairs, n_empty = [], 0
    for i, (prompt, chosen, rejected) in enumerate(zip(prompts, chosen_full, rejected_full)):
        if chosen[: len(prompt)] != prompt or rejected[: len(prompt)] != prompt:
            raise InputError(
                f"{source}: row {i + 1}: the chat template renders the prompt differently with and without "
                "the reply, so completion tokens cannot be separated; use a model with a prefix-stable template"
            )
        kept_prompt = prompt[-args.max_prompt_length :]
        room = args.max_length - len(kept_prompt)
        pair = Pair(kept_prompt, chosen[len(prompt) :][:room], rejected[len(prompt) :][:room])
        if not pair.chosen_ids or not pair.rejected_ids:
            n_empty += 1
            continue
        pairs.append(pair)
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
    """(rank, world size, device). Without torchrun, a one-process group, so there is one code path."""
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


def shard_model(model: nn.Module, args: TrainArgs, device: torch.device) -> LogpsModel:
    """FSDP2: each decoder layer, then the root; bf16 compute over fp32 master weights on GPU."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    on_gpu_bf16 = device.type == "cuda" and args.bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_gpu_bf16 else None
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    policy = LogpsModel(model, args.logps_chunk_size)
    full_state = policy.state_dict() if dist.get_rank() == 0 else {}
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, mesh=mesh, mp_policy=mp or MixedPrecisionPolicy())
    fully_shard(policy, mesh=mesh, mp_policy=mp or MixedPrecisionPolicy())
    if dist.get_world_size() > 1:  # the other ranks hold empty (meta) shards: rank 0 sends the weights
        if dist.get_rank() != 0:
            policy.to_empty(device=device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(policy, full_state, options=options)
        for buffer in policy.buffers():  # e.g. rotary frequencies, which no state dict carries
            dist.broadcast(buffer, src=0)
    return policy.to(device)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ---- reference log-probs ----


def _shard_logps(policy: LogpsModel, pairs: list[Pair], batch_size: int, pad_id: int, device, desc: str) -> Tensor:
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
    and its weight files' sizes and times, so a folder trained again gets a new reference."""
    if args.model == "tiny":
        return f"tiny|seed {args.seed}"
    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        return args.model  # a hub name: a new revision pushed under the same name is not noticed
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return str(folder.resolve()) + "".join(f"|{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in files)


def ref_cache_key(weights_id: str, compute_dtype: str, pairs: list[Pair]) -> str:
    """Reference log-probs depend on the initial weights, their precision and the exact tokens (template,
    lengths, data)."""
    digest = hashlib.sha256(f"{weights_id}|{compute_dtype}".encode())
    for pair in pairs:
        for ids in pair:
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:24]


def reference_logps(
    policy: LogpsModel, pairs: list[Pair], args: TrainArgs, pad_id: int, device, name: str, log
) -> Tensor:
    """[N, 2] reference (chosen, rejected) log-probs: the model at its initial weights, computed once and
    cached on disk, so training holds one model and every method reuses the same numbers."""
    compute_dtype = "bf16" if device.type == "cuda" and args.bf16 else "fp32"
    cache_dir = Path(args.ref_cache_dir).expanduser()
    cache_file = cache_dir / f"{ref_cache_key(initial_weights_id(args), compute_dtype, pairs)}.pt"
    cached = torch.tensor(float(cache_file.is_file()), device=device)  # NCCL reduces only GPU tensors
    dist.all_reduce(cached, op=dist.ReduceOp.MIN)  # every rank must agree, or some would wait in forwards
    if cached.item():
        log(f"reference log-probs ({name}): reusing cache {cache_file}")
        return torch.load(cache_file, map_location=device)
    ref = _shard_logps(policy, pairs, 2 * args.micro_batch_size, pad_id, device, f"reference ({name})")[:, :2]
    if dist.get_rank() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(ref.cpu(), tmp)
        os.replace(tmp, cache_file)
    log(f"reference log-probs ({name}): computed {len(pairs)} pairs, cached in {cache_file}")
    return ref


# ---- checkpoints ----


def save_checkpoint(output_dir: Path, policy, optimizer, scheduler, step: int, loss_state=None) -> None:
    """Model and optimizer shards (torch.distributed.checkpoint), scheduler, RNG, data position and the
    loss's state (the same on every rank), written to checkpoint.tmp and then swapped in, so a crash never
    leaves a half-written checkpoint."""
    rank = dist.get_rank()
    final, tmp, old = output_dir / "checkpoint", output_dir / "checkpoint.tmp", output_dir / "checkpoint.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(
        {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        tmp / f"rng_rank{rank}.pt",
    )
    if rank == 0:
        loss = loss_state.state_dict() if loss_state is not None else None
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "loss_state": loss}, tmp / "trainer.pt")
    dist.barrier()
    if rank == 0:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def find_checkpoint(output_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old only survives a crash in the middle of the swap
        if (output_dir / name / "trainer.pt").is_file():
            return output_dir / name
    return None


def load_checkpoint(path: Path, policy, optimizer, scheduler, loss_state=None) -> int:
    model_state, optim_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    if loss_state is not None:
        loss_state.load_state_dict(trainer["loss_state"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
    return trainer["step"]


def save_model(output_dir: Path, policy: LogpsModel, tokenizer, save_dtype: torch.dtype) -> None:
    """A Hugging Face model folder that from_pretrained and vLLM load unchanged."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model = policy.model
        # Tied weights (lm_head = embeddings) come back from the gather as two tensors: keep the one name
        # from_pretrained expects, as an unsharded save_pretrained would.
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        state = {k.removeprefix("model."): v.to(save_dtype) for k, v in full.items()}
        state = {k: v for k, v in state.items() if k not in tied}
        model.config.dtype = save_dtype
        model.config.use_cache = True
        model.save_pretrained(output_dir, state_dict=state)
        tokenizer.save_pretrained(output_dir)
    dist.barrier()


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


def pair_logps(logps: Tensor, lens: Tensor, ref: Tensor | None) -> PairLogps:
    b = logps.shape[0] // 2
    ref_chosen, ref_rejected = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
    return PairLogps(logps[:b], logps[b:], ref_chosen, ref_rejected, lens[:b], lens[b:])


def correct(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """[B] 1 where the chosen reward wins, 0.5 on a tie (policy = reference at step 0), else 0."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def evaluate(policy, test_pairs, test_ref, loss_fn, args, pad_id, device) -> dict:
    """Held-out reward accuracy: the share of pairs whose chosen reward beats the rejected one."""
    out = _shard_logps(policy, test_pairs, 2 * args.micro_batch_size, pad_id, device, "held-out")
    lp = pair_logps(torch.cat([out[:, 0], out[:, 1]]), torch.cat([out[:, 2], out[:, 3]]), test_ref)
    with torch.no_grad():  # also tells a stateful loss (gammapo.py) that these pairs are held out
        losses, chosen_rewards, rejected_rewards = loss_fn(lp, args)
    return {
        "eval/reward_accuracy": correct(chosen_rewards, rejected_rewards).mean().item(),
        "eval/loss": losses.mean().item(),
        "eval/margin": (chosen_rewards - rejected_rewards).mean().item(),
    }


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train_step(policy, optimizer, scheduler, batch, pairs, ref, loss_fn, args, pad_id, device) -> dict:
    """One optimizer step over this rank's share of the global batch (indices into pairs and ref), in
    micro-batches; returns its metrics."""
    started = time.perf_counter()
    per_rank = args.global_batch_size // dist.get_world_size()
    n_micro = per_rank // args.micro_batch_size
    # On-device sums, reduced once per step: loss, rewards (chosen, rejected), accuracy, margin,
    # logps (chosen, rejected), tokens.
    totals = torch.zeros(8, device=device)
    for micro in range(n_micro):
        ids = batch[micro * args.micro_batch_size : (micro + 1) * args.micro_batch_size]
        input_ids, attention_mask, completion_mask = (t.to(device) for t in collate([pairs[i] for i in ids], pad_id))
        policy.set_requires_gradient_sync(micro == n_micro - 1)
        logps, lens = policy(input_ids, attention_mask, completion_mask)
        lp = pair_logps(logps, lens, ref[ids] if ref is not None else None)
        losses, chosen_rewards, rejected_rewards = loss_fn(lp, args)
        (losses.sum() / per_rank).backward()  # FSDP averages over ranks: the mean over the global batch
        totals += torch.stack(
            [
                losses.detach().sum(),
                chosen_rewards.sum(),
                rejected_rewards.sum(),
                correct(chosen_rewards, rejected_rewards).sum(),
                (chosen_rewards - rejected_rewards).sum(),
                lp.chosen.detach().sum(),
                lp.rejected.detach().sum(),
                attention_mask.sum(),
            ]
        )
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals = all_reduce_sum(totals).tolist()
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"]
    names += ["logps/chosen", "logps/rejected"]
    return {
        **{name: total / args.global_batch_size for name, total in zip(names, totals)},
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": grad_norm.item(),
        "tokens/s": totals[7] / (time.perf_counter() - started),
        "peak_memory_gb": peak_memory_gb(device),
    }


def train(args: TrainArgs, loss_fn, needs_reference: bool, method: str, loss_state=None) -> dict:
    """The whole run. Returns the last metrics (held-out accuracy included).

    loss_state: what the loss keeps between steps (gammapo.py's history of reward gaps), or None. It has
    reset(seed), state_dict() and load_state_dict(state); it is reset here and saved in checkpoints.
    """
    rank, world, device = setup_distributed()
    try:
        return _train(args, loss_fn, needs_reference, method, loss_state, rank, world, device)
    finally:
        dist.destroy_process_group()


def _train(args, loss_fn, needs_reference, method, loss_state, rank, world, device) -> dict:
    def log(message):
        if rank == 0:
            tqdm.write(f"[minpo] {message}")

    check_args(args, world)
    output_dir = Path(args.output_dir or f"ckpt/{method}")
    checkpoint_path = find_checkpoint(output_dir)
    if args.resume and checkpoint_path is None:
        raise InputError(f"--resume: no checkpoint in {output_dir}; run without --resume to start fresh")
    if not args.resume and checkpoint_path is not None:
        raise InputError(
            f"{output_dir} already holds a checkpoint: pass --resume to continue it, or pick another --output_dir"
        )
    torch.manual_seed(args.seed)
    if loss_state is not None:
        loss_state.reset(args.seed)

    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows, train_source, test_rows, test_source = load_data(args)
    train_rows, train_counts = select_and_flip(train_rows, train_source, args)
    if "kept" in train_counts:
        log(f"--select_frac {args.select_frac}: kept {train_counts['kept']} of {train_counts['loaded']} training pairs")
    if "flipped" in train_counts:
        log(
            f"--flip_frac {args.flip_frac}: swapped chosen and rejected in {train_counts['flipped']} of "
            f"{len(train_rows)} training pairs (seed {args.seed})"
        )
    train_pairs, train_empty = tokenize_pairs(train_rows, train_source, tokenizer, args)
    test_pairs, test_empty = tokenize_pairs(test_rows, test_source, tokenizer, args)
    if train_empty or test_empty:
        log(f"dropped {train_empty} training and {test_empty} held-out pairs left with no completion after truncation")
    if len(train_pairs) < args.global_batch_size:
        raise InputError(
            f"{train_source}: {len(train_pairs)} usable pairs, fewer than one "
            f"--global_batch_size {args.global_batch_size}"
        )

    policy = shard_model(load_model(args.model, tokenizer, torch.float32, args.seed, empty=rank != 0), args, device)
    train_ref = test_ref = None
    if needs_reference:  # before any checkpoint is loaded: the reference is the initial model
        train_ref = reference_logps(policy, train_pairs, args, pad_id, device, "train", log)
        test_ref = reference_logps(policy, test_pairs, args, pad_id, device, "held-out", log) if test_pairs else None

    steps_per_epoch = len(train_pairs) // args.global_batch_size
    total_steps = steps_per_epoch * args.num_epochs
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, args.warmup_ratio))
    start_step = 0
    if args.resume:
        start_step = load_checkpoint(checkpoint_path, policy, optimizer, scheduler, loss_state)
        log(f"resumed from {checkpoint_path} at step {start_step}")
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = output_dir / "metrics.jsonl"
    if rank == 0:
        kept = (
            [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            if (args.resume and metrics_file.exists())
            else []
        )
        metrics_file.write_text("".join(line + "\n" for line in kept))
        record = asdict(args) | {"train_rows": train_counts}  # how many rows --select_frac kept, --flip_frac flipped
        (output_dir / "args.json").write_text(json.dumps(record, indent=2) + "\n")

    def write_metrics(record):
        if rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")

    accumulation = args.global_batch_size // world // args.micro_batch_size
    log(
        f"{method}: {len(train_pairs)} pairs, {total_steps} steps of {args.global_batch_size} "
        f"({world} x {accumulation} x {args.micro_batch_size}), {len(test_pairs)} held-out pairs, on {device.type}"
    )
    result = {}
    if test_pairs and start_step == 0:
        result = evaluate(policy, test_pairs, test_ref, loss_fn, args, pad_id, device)
        write_metrics({"step": 0, **result})
        log(f"step 0: held-out reward accuracy {result['eval/reward_accuracy']:.3f}")
    first_accuracy = result.get("eval/reward_accuracy")

    bar = tqdm(total=total_steps, initial=start_step, desc=method, disable=rank != 0, dynamic_ncols=True)
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if step == start_step or index == 0:
            epoch_batches = step_batches(train_pairs, args, epoch)
        batch = epoch_batches[index][rank::world]  # rank r: every world-th pair by length
        record = {"step": step + 1, "epoch": epoch + (index + 1) / steps_per_epoch}
        record |= train_step(policy, optimizer, scheduler, batch, train_pairs, train_ref, loss_fn, args, pad_id, device)
        if test_pairs and (step + 1 == total_steps or (args.eval_steps and (step + 1) % args.eval_steps == 0)):
            record |= evaluate(policy, test_pairs, test_ref, loss_fn, args, pad_id, device)
        write_metrics(record)
        result = record
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracy']:.2f}")
        bar.update()
        if args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            save_checkpoint(output_dir, policy, optimizer, scheduler, step + 1, loss_state)
    bar.close()

    save_dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32
    save_model(output_dir, policy, tokenizer, save_dtype)
    if rank == 0:  # the run is complete: the model folder replaces its checkpoint
        shutil.rmtree(output_dir / "checkpoint", ignore_errors=True)
    if "eval/reward_accuracy" in result:
        start = f"{first_accuracy:.3f} -> " if first_accuracy is not None else ""
        log(f"held-out reward accuracy {start}{result['eval/reward_accuracy']:.3f}")
    log(f"model saved to {output_dir}")
    return result


def main(args_cls: type[TrainArgs], loss_fn, needs_reference: bool, loss_state=None) -> None:
    """Entry point of every method file: parse flags, train, and print bad input as one line."""
    method = Path(inspect.getfile(loss_fn)).stem
    args = parse_args(args_cls)
    try:
        train(args, loss_fn, needs_reference, method, loss_state)
    except InputError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{method}: error: {e}", file=sys.stderr)
        sys.exit(2)
