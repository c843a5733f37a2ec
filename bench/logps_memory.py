"""Peak memory of one log-prob forward + backward: common.batch_logps against the full-logits way.

The full-logits way is what a plain trainer does: model(...).logits [N, T, V], log_softmax in fp32,
gather the label tokens. batch_logps never builds [N, T, V]: it runs lm_head on completion positions
only, in chunks, recomputed in backward. Each measurement runs in a fresh process (peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU) and is reported above the memory of the model itself.

    python bench/logps_memory.py                       # vocabulary 32k and 128k, sequence 1024
    python bench/logps_memory.py --vocab 32768 --seq 2048 --batch 4
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def full_logits_logps(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # [N, T-1, V]
    token_logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1), completion_mask[:, 1:].sum(-1)


def measure(mode: str, vocab: int, seq: int, batch: int, chunk_size: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
    )
    model = Qwen2ForCausalLM(config).to(device)
    input_ids = torch.randint(0, vocab, (batch, seq), device=device)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = (torch.arange(seq, device=device) >= seq // 2).long().expand(batch, -1)  # half prompt, half reply
    before = peak_gb(device)
    started = time.perf_counter()
    if mode == "chunked":
        sums, _ = common.batch_logps(model, input_ids, attention_mask, completion_mask, chunk_size=chunk_size)
    else:
        sums, _ = full_logits_logps(model, input_ids, attention_mask, completion_mask)
    sums.sum().backward()
    return {
        "mode": mode,
        "vocab": vocab,
        "seq": seq,
        "batch": batch,
        "device": device.type,
        "extra_peak_gb": peak_gb(device) - before,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="sequences (2 x pairs)")
    parser.add_argument("--chunk_size", type=int, default=common.TrainArgs.logps_chunk_size)
    parser.add_argument("--child", choices=["chunked", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.vocab[0], args.seq, args.batch, args.chunk_size)))
        return
    print("| vocab | seq x batch | full logits: extra peak GB | batch_logps: extra peak GB | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for vocab in args.vocab:
        rows = {}
        for mode in ("full", "chunked"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--vocab",
                    str(vocab),
                    "--seq",
                    str(args.seq),
                    "--batch",
                    str(args.batch),
                    "--chunk_size",
                    str(args.chunk_size),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        full, chunked = rows["full"]["extra_peak_gb"], rows["chunked"]["extra_peak_gb"]
        print(f"| {vocab} | {args.seq} x {args.batch} | {full:.2f} | {chunked:.2f} | {chunked / full:.2f} |")
    print(f"\ndevice: {rows['full']['device']}, batch_logps chunk: {args.chunk_size} tokens")


if __name__ == "__main__":
    main()
