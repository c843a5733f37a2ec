"""What only a GPU can show, skipped without CUDA (bench/gpu_check.py runs this file on the GPU machine):
- a bf16 training run of the tiny task on CUDA learns (held-out reward accuracy >= 0.9), as test_train.py's fp32 run
  does on CPU;
- common.batch_logps on CUDA, in fp32 and in bf16, agrees with the CPU fp32 values and gradients: fp32 to 1e-4 nats
  per completion token and 1e-4 of the gradient's norm; bf16 to 0.05 nats per token and 5% of the gradient's norm
  (bf16 against fp32 on CPU differs by 0.007 nats per token and 1.1% of the norm for this model and batch);
- the folder that run saved holds bf16 weights and loads and generates with transformers.
"""

import copy
import json

import pytest
import torch
from safetensors import safe_open

import common
import dpo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """`python dpo.py --model tiny --precision bf16` in this process: (its last metrics, its output folder)."""
    folder = tmp_path_factory.mktemp("bf16") / "dpo"
    argv = ["--model", "tiny", "--precision", "bf16", "--output_dir", str(folder)]
    args = common.parse_args(dpo.Args, argv + ["--ref_cache_dir", str(folder.parent / "refs")])
    return common.train(args, dpo.loss_fn, dpo.NEEDS_REFERENCE, "dpo"), folder


def test_bf16_training_on_cuda_learns(bf16_run):
    result, folder = bf16_run
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["eval/reward_accuracy"] == 0.5  # policy = reference: every pair ties
    assert result["eval/reward_accuracy"] >= 0.9
    peaks = [step["peak_memory_gb"] for step in steps if "peak_memory_gb" in step]
    assert 0 < max(peaks) < 1  # torch.cuda.max_memory_allocated of a tiny model, not the process's RSS


def test_saved_folder_is_bf16_and_loads(bf16_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = bf16_run
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    # eval.py and vLLM load with dtype "auto": config.json must name the weights' dtype, not the fp32 master weights'
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").cuda()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    ids = ids["input_ids"].cuda()
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def peaked_model_and_batch():
    """The tiny model with larger embeddings (tied to the LM head), so log-probs vary (about -12 nats per token, not
    a flat -log V), and 4 right-padded pairs of different lengths."""
    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(std=0.1)
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 256, (n,), generator=generator).tolist()

    pairs = [common.Pair(ids(20 + 7 * k), ids(30 + 5 * k), ids(10 + 9 * k)) for k in range(4)]
    return model, common.collate(pairs, tokenizer.pad_token_id)


def logps_and_grads(model, batch, device, dtype):
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    sums, lens = common.batch_logps(model, *(t.to(device) for t in batch), chunk_size=16)  # several chunks
    sums.sum().backward()
    grads = {name: p.grad.float().cpu() for name, p in model.named_parameters()}
    return sums.detach().cpu(), lens.cpu(), grads


@pytest.mark.parametrize("dtype, per_token, grad", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 0.05, 0.05)])
def test_batch_logps_on_cuda_matches_cpu(dtype, per_token, grad):
    model, batch = peaked_model_and_batch()
    cpu_sums, cpu_lens, cpu_grads = logps_and_grads(model, batch, "cpu", torch.float32)
    sums, lens, grads = logps_and_grads(model, batch, "cuda", dtype)
    assert torch.equal(lens, cpu_lens)
    assert ((sums - cpu_sums).abs() / cpu_lens).max() <= per_token
    # The key bias's exact gradient is zero (softmax ignores what every key adds equally): only rounding is left.
    names = [name for name in cpu_grads if not name.endswith("k_proj.bias")]
    cpu_all, all_ = (torch.cat([g[name].flatten() for name in names]) for g in (cpu_grads, grads))
    assert (all_ - cpu_all).norm() <= grad * cpu_all.norm()
    for name in names:  # and no single tensor hides a large error inside a small overall one
        assert (grads[name] - cpu_grads[name]).norm() <= 2 * grad * cpu_grads[name].norm(), name
