"""Per-GPU memory budget of minpo's training step, computed from a model's config: one term per line.

What one GPU holds at the peak of a micro-batch (the start of its backward) when common.py trains with FSDP2
(`fully_shard` on each decoder layer, then on the root), bf16 compute over fp32 master weights
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`), AdamW, and `batch_logps`' chunked LM head:
- model state: fp32 weights, gradients and AdamW moments, sharded over the GPUs;
- with gradient sync only on the last micro-batch (`--gradient_sync step`:
  `set_requires_gradient_sync(micro == n_micro - 1)`): the full, unsharded fp32 gradient, held between micro-batches;
- FSDP buffers: the root's bf16 parameters (embeddings, final norm, lm_head: unsharded for the whole forward and
  backward), two all-gathered bf16 decoder layers, one layer's gradient and its fp32 reduce-scatter input;
- activations saved for backward: bf16 Qwen2 decoder layers as transformers 5 runs them with SDPA, or with
  gradient checkpointing only each layer's input plus one layer recomputed; the final norm; the completion
  hidden states that go through lm_head;
- the LM head: one fp32 [chunk, V] logits buffer, and in backward an fp32 [V, H] weight gradient plus its bf16 copy.

Activation formulas are checked against what autograd really saves in tests/test_memory_budget.py. Everything
else is read off the code (common.py, torch's FSDP2); see bench/MEMORY.md for the table and its caveats.

    python bench/memory_budget.py                                      # Qwen2.5-7B-Instruct, the default command
    python bench/memory_budget.py --config path/to/model_folder --world_size 4 --gradient_checkpointing on
    python bench/memory_budget.py --output bench/MEMORY.md             # rewrite the committed table
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "bench/configs/Qwen2.5-7B-Instruct"
GIB = 2**30  # "GB" as torch.cuda.max_memory_allocated() / 2**30 and minpo's peak_memory_gb report it
BF16, FP32, INT64 = 2, 4, 8  # bytes per element


@dataclass(frozen=True)
class Shape:
    """What the budget reads from a Hugging Face config, named as the formulas name it."""

    hidden: int  # H
    intermediate: int  # I
    layers: int  # L
    heads: int  # h (query heads)
    kv_heads: int  # g (key/value heads, GQA)
    head_dim: int  # d
    vocab: int  # V
    tied: bool  # lm_head shares the embedding matrix

    @classmethod
    def from_config(cls, config) -> "Shape":
        if config.model_type != "qwen2":
            raise ValueError(
                f"model_type {config.model_type!r}: only Qwen2 decoders are modelled "
                "(q/k/v biases, RMSNorm, SwiGLU, no q/k norms)"
            )
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            vocab=config.vocab_size,
            tied=bool(config.tie_word_embeddings),
        )


@dataclass(frozen=True)
class Run:
    """The training command, as far as memory cares."""

    world_size: int = 8  # W
    pairs: int = 2  # --micro_batch_size: pairs per forward on each GPU
    max_length: int = 2048  # T: every sequence padded to the longest row, at most --max_length
    chunk_size: int = 256  # c: --logps_chunk_size
    completion_frac: float = 0.5  # K / n: share of positions that predict a completion token
    gradient_checkpointing: bool = False
    sync_every_micro_batch: bool = False  # False: --gradient_sync step (set_requires_gradient_sync on the last)

    @property
    def sequences(self) -> int:  # S: chosen and rejected rows
        return 2 * self.pairs

    @property
    def tokens(self) -> int:  # n = S·T: positions through the backbone, padding included
        return self.sequences * self.max_length

    @property
    def completion_tokens(self) -> int:  # K: positions whose hidden state goes through lm_head
        return round(self.completion_frac * self.tokens)


# ---- parameters ----


def layer_params(s: Shape) -> int:
    """P_layer: one Qwen2 decoder layer."""
    q = s.hidden * s.heads * s.head_dim + s.heads * s.head_dim  # q_proj, with bias
    kv = 2 * (s.hidden * s.kv_heads * s.head_dim + s.kv_heads * s.head_dim)  # k_proj, v_proj, with bias
    o = s.heads * s.head_dim * s.hidden  # o_proj, no bias
    mlp = 3 * s.hidden * s.intermediate  # gate_proj, up_proj, down_proj, no bias
    return q + kv + o + mlp + 2 * s.hidden  # + input and post-attention RMSNorm weights


def root_params(s: Shape) -> int:
    """P_root: what the root FSDP unit holds: embeddings, final norm and (untied) lm_head."""
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def total_params(s: Shape) -> int:
    """P = L·P_layer + P_root."""
    return s.layers * layer_params(s) + root_params(s)


# ---- activations saved for backward, bytes per token (bf16 compute) ----


def rmsnorm_bytes_per_token(s: Shape) -> int:
    """Qwen2RMSNorm upcasts: x.to(fp32) is saved by pow and by the multiply (4H), rsqrt's [.., 1] output (4),
    and the normalized x.to(bf16) by `weight * x` (2H). Its output is counted where it is used."""
    return FP32 * s.hidden + FP32 + BF16 * s.hidden


def attention_bytes_per_token(s: Shape) -> int:
    """q/k/v_proj share one saved input, the normed hidden state (2H). Rotary saves only cos/sin (shared, see
    inputs_and_rotary). SDPA (flash kernel, enable_gqa since there is no mask) saves rotated q (2hd), k and v
    unexpanded (2·2gd), its output (2hd, which o_proj saves too: same storage) and an fp32 logsumexp (4h)."""
    q_and_out = 2 * BF16 * s.heads * s.head_dim
    k_and_v = 2 * BF16 * s.kv_heads * s.head_dim
    return BF16 * s.hidden + q_and_out + k_and_v + FP32 * s.heads


def mlp_bytes_per_token(s: Shape) -> int:
    """gate/up_proj share one saved input (2H); SiLU saves gate's output, the product saves silu(gate) and up,
    down_proj saves the product: four [n, I] bf16 tensors."""
    return BF16 * s.hidden + 4 * BF16 * s.intermediate


def layer_bytes_per_token(s: Shape) -> int:
    """A_layer: one decoder layer. Residual adds save nothing."""
    return 2 * rmsnorm_bytes_per_token(s) + attention_bytes_per_token(s) + mlp_bytes_per_token(s)


# ---- the terms of the budget, in bytes ----
# Each term: (label, formula, bytes(shape, run) or None where it does not apply to that run).


def sharded_weights(s: Shape, r: Run) -> int:
    """fp32 master weights, 1/W of each parameter per GPU."""
    return FP32 * total_params(s) // r.world_size


def sharded_gradients(s: Shape, r: Run) -> int | None:
    """fp32 gradient shards. Syncing every micro-batch, FSDP2 reduce-scatters each one and adds the shard into
    param.grad. Syncing on the last only, there are none at the peak: train_step's zero_grad(set_to_none=True)
    dropped them after the previous step, and they appear only as the last micro-batch frees the unsharded ones."""
    return FP32 * total_params(s) // r.world_size if r.sync_every_micro_batch else None


def adam_moments(s: Shape, r: Run) -> int:
    """AdamW exp_avg and exp_avg_sq, fp32, sharded like the weights."""
    return 2 * FP32 * total_params(s) // r.world_size


def unsharded_gradient(s: Shape, r: Run) -> int | None:
    """The full fp32 gradient on every GPU, between micro-batches, when gradient sync is off. torch 2.13,
    torch/distributed/fsdp/_fully_shard/: set_requires_gradient_sync(False) sets reduce_grads = False
    (_fully_shard.py:434); post_backward then skips the reduce-scatter and, after resharding the bf16 parameters,
    upcasts each unsharded bf16 gradient to reduce_dtype, fp32 (_fsdp_param_group.py:607-612 ->
    _fsdp_param.py:813 `self.unsharded_accumulated_grad = unsharded_grad.to(self.reduce_dtype)`); later
    micro-batches add their bf16 gradient into it (_fsdp_param.py:820, called at _fsdp_param_group.py:605); the
    synced micro-batch reduce-scatters it (_fsdp_param_group.py:623-626)."""
    return None if r.sync_every_micro_batch else FP32 * total_params(s)


def root_unsharded(s: Shape, r: Run) -> int:
    """bf16 copies of the root's parameters: FSDP2 does not reshard the root after forward (_fsdp_state.py:203-207),
    so they stay all-gathered from the embedding lookup to the end of backward."""
    return BF16 * root_params(s)


def gathered_layers(s: Shape, r: Run) -> int:
    """bf16 all-gathered decoder layers: the one computing and the one prefetched."""
    return 2 * BF16 * layer_params(s)


def layer_gradient_buffers(s: Shape, r: Run) -> int:
    """In one layer's backward: its unsharded bf16 gradient, while the previous layer's fp32 reduce-scatter input
    (_fsdp_collectives.py:597, dtype=reduce_dtype) is in flight. The last micro-batch reduce-scatters when
    syncing only there too, so both runs hold it."""
    return (BF16 + FP32) * layer_params(s)


def decoder_activations(s: Shape, r: Run) -> int | None:
    """Every decoder layer's saved tensors (no checkpointing)."""
    return None if r.gradient_checkpointing else s.layers * r.tokens * layer_bytes_per_token(s)


def checkpointed_inputs(s: Shape, r: Run) -> int | None:
    """With checkpointing (use_reentrant=False) each layer keeps only its bf16 input hidden state [n, H]; layer 0's
    is the embedding output."""
    return s.layers * r.tokens * BF16 * s.hidden if r.gradient_checkpointing else None


def recomputed_layer(s: Shape, r: Run) -> int | None:
    """With checkpointing: one layer's full saved tensors, rebuilt in its backward."""
    return r.tokens * layer_bytes_per_token(s) if r.gradient_checkpointing else None


def final_norm(s: Shape, r: Run) -> int:
    """The model's last RMSNorm, over all n positions (its output is indexed, not saved)."""
    return r.tokens * rmsnorm_bytes_per_token(s)


def inputs_and_rotary(s: Shape, r: Run) -> int:
    """Token ids (int64, saved by the embedding) and the bf16 rotary cos and sin [T, d], shared by all layers.
    Without checkpointing the embedding output itself is not saved: layer 0's RMSNorm keeps its fp32 copy."""
    return INT64 * r.tokens + 2 * BF16 * r.max_length * s.head_dim


def completion_states(s: Shape, r: Run) -> int:
    """What ChunkedTokenLogps and batch_logps save for the K completion positions: hidden states [K, H] bf16,
    labels (int64), row of each token (a view of nonzero()'s [K, 2] int64), fp32 log-sum-exp, and the fp32
    log-probs that index_add saves; and the [S, T-1] bool mask the gather saves."""
    per_token = BF16 * s.hidden + INT64 + 2 * INT64 + FP32 + FP32
    return r.completion_tokens * per_token + r.sequences * (r.max_length - 1)


def logits_buffer(s: Shape, r: Run) -> int:
    """ChunkedTokenLogps' one fp32 [c, V] buffer, reused by every chunk (forward, and again in backward)."""
    return FP32 * min(r.chunk_size, r.completion_tokens) * s.vocab


def head_backward(s: Shape, r: Run) -> int:
    """ChunkedTokenLogps.backward: the fp32 [V, H] grad_weight, its bf16 copy (returned, then held as lm_head's
    grad until the root's post-backward) and grad_hidden [K, H] bf16."""
    return (FP32 + BF16) * s.vocab * s.hidden + BF16 * r.completion_tokens * s.hidden


@dataclass(frozen=True)
class Term:
    label: str
    formula: str
    size: Callable[[Shape, Run], int | None]  # bytes, or None where the term does not exist in that run
    activation: bool = False  # saved by autograd: what tests/test_memory_budget.py measures


TERMS = [
    Term("fp32 weights, sharded", "4·P / W", sharded_weights),
    Term("fp32 gradients, sharded", "4·P / W", sharded_gradients),
    Term("AdamW moments, sharded", "2·4·P / W", adam_moments),
    Term("fp32 gradient, unsharded (accumulated across micro-batches)", "4·P", unsharded_gradient),
    Term("root bf16 params: embeddings, final norm, lm_head", "2·P_root", root_unsharded),
    Term("2 all-gathered bf16 decoder layers", "2·2·P_layer", gathered_layers),
    Term("layer bf16 gradient + fp32 reduce-scatter input", "(2 + 4)·P_layer", layer_gradient_buffers),
    Term("decoder activations, all layers", "L·n·A_layer", decoder_activations, activation=True),
    Term("checkpointed layer inputs", "L·n·2H", checkpointed_inputs, activation=True),
    Term("one layer recomputed in backward", "n·A_layer", recomputed_layer),
    Term("final RMSNorm", "n·(6H + 4)", final_norm, activation=True),
    Term("token ids, rotary cos/sin", "8n + 4·T·d", inputs_and_rotary, activation=True),
    Term("completion hidden states, labels, logps", "K·(2H + 32) + S·(T-1)", completion_states, activation=True),
    Term("LM-head fp32 logits buffer", "4·c·V", logits_buffer),
    Term("LM-head backward: fp32 + bf16 [V, H] grad, [K, H] grad", "6·V·H + 2·K·H", head_backward),
]


def activation_bytes(s: Shape, r: Run) -> int:
    """What autograd saves in one forward of batch_logps: the sum of the activation terms."""
    return sum(term.size(s, r) or 0 for term in TERMS if term.activation)


def budget(s: Shape, r: Run) -> list[tuple[Term, int | None]]:
    return [(term, term.size(s, r)) for term in TERMS]


def total_bytes(s: Shape, r: Run) -> int:
    return sum(b or 0 for _, b in budget(s, r))


# ---- report ----

# Cheapest first: syncing every micro-batch adds one fp32 reduce-scatter per micro-batch (overlapped with backward);
# gradient checkpointing adds a forward of every layer (about +33% FLOPs).
COMBINATIONS = [(False, False), (False, True), (True, False), (True, True)]  # (checkpointing, sync every)


def combination_name(gradient_checkpointing: bool, sync_every: bool) -> str:
    checkpointing = "checkpointing" if gradient_checkpointing else "no checkpointing"
    return f"{checkpointing}, sync {'every micro-batch' if sync_every else 'last micro-batch'}"


def load_shape(config: str) -> Shape:
    """A model folder, a config.json, a path relative to the repository (the shipped configs), or a hub name."""
    from transformers import AutoConfig

    path = Path(config) if Path(config).exists() else REPO_DIR / config
    return Shape.from_config(AutoConfig.from_pretrained(str(path) if path.exists() else config))


def table(s: Shape, runs: list[Run], gpu_gb: float, headroom: float) -> str:
    """Markdown: one row per term, one GiB column per run; totals, headroom and fit below."""
    header = (
        "| term | formula | "
        + " | ".join(combination_name(r.gradient_checkpointing, r.sync_every_micro_batch) for r in runs)
        + " |"
    )
    lines = [header, "|---|---|" + "---:|" * len(runs)]
    rows = [budget(s, r) for r in runs]
    for i, term in enumerate(TERMS):
        cells = [f"{b / GIB:.2f}" if b is not None else "–" for b in (row[i][1] for row in rows)]
        if all(cell == "–" for cell in cells):
            continue
        lines.append(f"| {term.label} | {term.formula} | " + " | ".join(cells) + " |")
    totals = [total_bytes(s, r) / GIB for r in runs]
    lines.append("| **total per GPU** | | " + " | ".join(f"**{t:.2f}**" for t in totals) + " |")
    lines.append(
        f"| headroom against {gpu_gb:g} GiB | 1 − total / {gpu_gb:g} | "
        + " | ".join(f"{1 - t / gpu_gb:.1%}" for t in totals)
        + " |"
    )
    lines.append(
        f"| fits with ≥ {headroom:.0%} headroom (total ≤ {(1 - headroom) * gpu_gb:g} GiB) | | "
        + " | ".join("yes" if t <= (1 - headroom) * gpu_gb else "no" for t in totals)
        + " |"
    )
    return "\n".join(lines) + "\n"


def legend(s: Shape, r: Run) -> str:
    return (
        f"P = {total_params(s):,} parameters (P_layer = {layer_params(s):,}, P_root = {root_params(s):,}); "
        f"W = {r.world_size} GPUs; S = {r.sequences} sequences ({r.pairs} pairs) of T = {r.max_length} tokens, "
        f"n = S·T = {r.tokens:,} positions, K = {r.completion_tokens:,} completion positions "
        f"({r.completion_frac:.0%} of n, assumed); c = {r.chunk_size}; L = {s.layers}, H = {s.hidden}, "
        f"I = {s.intermediate}, h = {s.heads}, g = {s.kv_heads}, d = {s.head_dim}, V = {s.vocab}.\n\n"
        f"A_layer = 2·(4H + 4 + 2H) [two RMSNorms] + 2H + 2·2·h·d + 2·2·g·d + 4h [attention] + 2H + 4·2I [MLP] "
        f"= {layer_bytes_per_token(s):,} bytes per token per layer (bf16). GiB = 2^30 bytes; "
        "–: not held at the peak in that combination.\n"
    )


def verdict(s: Shape, runs: list[Run], gpu_gb: float, headroom: float) -> str:
    limit = (1 - headroom) * gpu_gb
    fitting = [r for r in runs if total_bytes(s, r) / GIB <= limit]
    if not fitting:
        return f"No combination fits with {headroom:.0%} headroom (total ≤ {limit:g} GiB).\n"
    best = fitting[0]  # runs are in COMBINATIONS order: cheapest first
    total = total_bytes(s, best) / GIB
    return (
        f"Lightest combination that fits with ≥ {headroom:.0%} headroom: "
        f"**{combination_name(best.gradient_checkpointing, best.sync_every_micro_batch)}**, "
        f"{total:.1f} GiB of {gpu_gb:g}, headroom {1 - total / gpu_gb:.1%}.\n"
    )


MARKERS = ("<!-- memory_budget.py: begin -->\n", "<!-- memory_budget.py: end -->\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="model folder, config.json, or hub name")
    parser.add_argument("--world_size", type=int, default=8, help="GPUs (FSDP shards)")
    parser.add_argument("--micro_batch_size", type=int, default=2, help="pairs per forward on each GPU")
    parser.add_argument("--max_length", type=int, default=2048, help="tokens per sequence (padded width)")
    parser.add_argument("--logps_chunk_size", type=int, default=256)
    parser.add_argument("--completion_frac", type=float, default=0.5, help="share of positions that are completion")
    parser.add_argument("--gradient_checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--grad_sync", choices=["last", "every", "both"], default="both", help="micro-batches")
    parser.add_argument("--gpu_gb", type=float, default=80.0, help="GPU memory in GiB")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction of the GPU to leave free")
    parser.add_argument(
        "--output",
        help="also write the table here; in a file with the begin/end markers, only the part between them is replaced",
    )
    return parser.parse_args(argv)


def render(argv: list[str] | None = None) -> str:
    """The legend, table and verdict for these flags (the default command without any)."""
    args = parse_args(argv or [])
    shape = load_shape(args.config)
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    sync_every = {"last": [False], "every": [True], "both": [False, True]}[args.grad_sync]
    runs = [
        Run(
            world_size=args.world_size,
            pairs=args.micro_batch_size,
            max_length=args.max_length,
            chunk_size=args.logps_chunk_size,
            completion_frac=args.completion_frac,
            gradient_checkpointing=gc,
            sync_every_micro_batch=every,
        )
        for gc, every in COMBINATIONS
        if gc in checkpointing and every in sync_every
    ]
    text = legend(shape, runs[0]) + "\n" + table(shape, runs, args.gpu_gb, args.headroom) + "\n"
    return text + verdict(shape, runs, args.gpu_gb, args.headroom)


def write(path: Path, text: str) -> None:
    begin, end = MARKERS
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        text = old[: old.index(begin) + len(begin)] + text + old[old.index(end) :]
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        text = render(argv)
    except (OSError, ValueError) as e:  # unreadable config, unknown hub name offline, not a Qwen2 model
        print(f"memory_budget: error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        sys.exit(2)
    print(text, end="")
    output = parse_args(argv).output
    if output:
        write(Path(output), text)


if __name__ == "__main__":
    main()
