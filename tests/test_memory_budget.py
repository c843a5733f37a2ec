"""bench/memory_budget.py against what PyTorch really does, on CPU.

- Activations: the bytes of every tensor autograd saves during a bf16 forward of common.batch_logps (summed over
  unique storages, parameters left out) on small Qwen2 models of different shapes (GQA, MHA, tied), with and
  without gradient checkpointing, equal the script's estimate to within 1% (exactly, today); and a wrong formula
  (MLP intermediates forgotten, RMSNorm's fp32 copy forgotten, k/v counted at every query head, SDPA output
  forgotten, checkpointing saving everything) misses by more than that.
- Parameters: the count from the config equals sum(numel) of the model built from the shipped Qwen2.5-7B-Instruct
  config on the meta device, and of the small models.
- FSDP2 (2 processes on gloo, bf16 params over fp32 master weights): with gradient sync off, each process holds
  the full unsharded gradient in fp32 (4·P bytes) after a backward and no sharded one; with sync on, only
  fp32 shards.
- bench/MEMORY.md holds the table the script prints for the default command.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import common

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import memory_budget as mb  # noqa: E402

# On these shapes the estimate equals the saved bytes exactly (torch 2.13, transformers 5.19). 1% leaves room for a
# later version adding or dropping a small tensor (a mask, a scalar), and stays under the smallest per-token term
# the check must catch: the SDPA output, 2hd bytes per layer, is 4% of the total in the "gqa" shape; the wrong
# formulas below miss by 4% to 47%.
TOLERANCE = 0.01
SHAPES = {
    "gqa": dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2, head_dim=32),
    "mha": dict(hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=3, head_dim=64),
    "tied": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}
PAIRS, LENGTH, CHUNK = 2, 64, 48  # 4 sequences of 64 tokens, the second half of each a completion


def small_model(name: str) -> Qwen2ForCausalLM:
    shape = {"tie_word_embeddings": False, **SHAPES[name]}
    config = Qwen2Config(vocab_size=1024, num_hidden_layers=2, max_position_embeddings=LENGTH, use_cache=False, **shape)
    config._attn_implementation = "sdpa"  # what from_pretrained picks on GPU; stated, not left to defaults
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(torch.bfloat16)  # bf16 parameters, as FSDP2's param_dtype gives the GPU


def batch():
    input_ids = torch.randint(0, 1024, (2 * PAIRS, LENGTH), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)  # no padding: n = S·T positions, as the budget counts them
    completion_mask = (torch.arange(LENGTH) >= LENGTH // 2).long().expand(2 * PAIRS, -1).contiguous()
    return input_ids, attention_mask, completion_mask


def saved_bytes(model, gradient_checkpointing: bool) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward of batch_logps, parameters left out
    (FSDP frees and re-gathers those; the budget counts them elsewhere)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return tensor

    # With checkpointing, the checkpoint's own hooks take over inside each layer: these see what it keeps.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sums, _ = common.batch_logps(model, *batch(), chunk_size=CHUNK)
    assert sums.requires_grad  # everything saved is still alive, so no address was reused
    return sum(storages.values())


def run(gradient_checkpointing: bool) -> mb.Run:
    return mb.Run(
        world_size=1,
        pairs=PAIRS,
        max_length=LENGTH,
        chunk_size=CHUNK,
        completion_frac=(LENGTH // 2) / LENGTH,
        gradient_checkpointing=gradient_checkpointing,
    )


def estimate(model, gradient_checkpointing: bool) -> int:
    shape = mb.Shape.from_config(model.config)
    estimated = mb.activation_bytes(shape, run(gradient_checkpointing))
    if gradient_checkpointing:  # the layers get cos/sin as keyword arguments, which the checkpoint keeps by
        estimated -= 2 * mb.BF16 * LENGTH * shape.head_dim  # closure, not through saved-tensor hooks
    return estimated


@pytest.fixture(scope="module")
def measured():
    """{(shape name, checkpointing): (model, saved bytes)}, measured once."""
    out = {}
    for name in SHAPES:
        for gradient_checkpointing in (False, True):
            model = small_model(name)
            out[name, gradient_checkpointing] = model, saved_bytes(model, gradient_checkpointing)
    return out


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["full", "checkpointing"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_activation_estimate_matches_saved_tensors(measured, name, gradient_checkpointing):
    model, saved = measured[name, gradient_checkpointing]
    estimated = estimate(model, gradient_checkpointing)
    assert abs(estimated - saved) / saved < TOLERANCE, f"estimate {estimated:,} B, autograd saved {saved:,} B"


WRONG_FORMULAS = {
    "MLP intermediates forgotten": ("mlp_bytes_per_token", lambda s: mb.BF16 * s.hidden),
    "RMSNorm fp32 copy forgotten": ("rmsnorm_bytes_per_token", lambda s: mb.FP32 + mb.BF16 * s.hidden),
    "k/v counted at every query head": (
        "attention_bytes_per_token",
        lambda s: mb.BF16 * s.hidden + 4 * mb.BF16 * s.heads * s.head_dim + mb.FP32 * s.heads,
    ),
    "SDPA output forgotten": (
        "attention_bytes_per_token",
        lambda s: mb.BF16 * s.hidden + mb.BF16 * (s.heads + 2 * s.kv_heads) * s.head_dim + mb.FP32 * s.heads,
    ),
}


@pytest.mark.parametrize("wrong", list(WRONG_FORMULAS))
def test_a_wrong_layer_formula_fails(measured, monkeypatch, wrong):
    """The check above is not vacuous: each of these mistakes puts the estimate outside the tolerance."""
    function_name, replacement = WRONG_FORMULAS[wrong]
    monkeypatch.setattr(mb, function_name, replacement)
    model, saved = measured["gqa", False]
    assert abs(estimate(model, False) - saved) / saved > TOLERANCE


def test_checkpointing_that_kept_everything_fails(measured, monkeypatch):
    """A budget that counted full activations under checkpointing would be far from what is saved."""
    wrong = [
        dataclasses.replace(term, size=lambda s, r: s.layers * r.tokens * mb.layer_bytes_per_token(s))
        if term.size is mb.checkpointed_inputs
        else term
        for term in mb.TERMS
    ]
    monkeypatch.setattr(mb, "TERMS", wrong)
    model, saved = measured["gqa", True]
    assert abs(estimate(model, True) - saved) / saved > TOLERANCE


def test_parameter_count_of_the_shipped_7b_config():
    config = AutoConfig.from_pretrained(REPO / mb.DEFAULT_CONFIG)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert mb.total_params(mb.Shape.from_config(config)) == sum(p.numel() for p in model.parameters())
    assert mb.total_params(mb.Shape.from_config(config)) == 7_615_616_512


@pytest.mark.parametrize("name", list(SHAPES))
def test_parameter_count_of_small_models(name):
    model = small_model(name)
    assert mb.total_params(mb.Shape.from_config(model.config)) == sum(p.numel() for p in model.parameters())


FSDP_WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, FSDPModule
sys.path.insert(0, sys.argv[1])
import common
from transformers import Qwen2Config, Qwen2ForCausalLM

dist.init_process_group("gloo")
torch.manual_seed(0)
config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, use_cache=False)
model = Qwen2ForCausalLM(config)  # fp32 master weights
n_params = sum(p.numel() for p in model.parameters())
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # common.shard_model on GPU
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh, mp_policy=mp)
policy = fully_shard(common.LogpsModel(model, 16), mesh=mesh, mp_policy=mp)
ids = torch.randint(0, 320, (4, 32))
batch = (ids, torch.ones_like(ids), (torch.arange(32) >= 16).long().expand(4, -1))

def held():
    unsharded, sharded = {}, {}
    for module in policy.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for p in group.fsdp_params:
                if p.unsharded_accumulated_grad is not None:
                    g = p.unsharded_accumulated_grad
                    unsharded[str(g.dtype)] = unsharded.get(str(g.dtype), 0) + g.numel() * g.element_size()
                if p.sharded_param.grad is not None:
                    g = p.sharded_param.grad.to_local()
                    sharded[str(g.dtype)] = sharded.get(str(g.dtype), 0) + g.numel() * g.element_size()
    return {"unsharded": unsharded, "sharded": sharded}

out = {"n_params": n_params}
for micro, sync in enumerate([False, False, True]):  # train_step: sync on the last micro-batch only
    policy.set_requires_gradient_sync(sync)
    logps, _ = policy(*batch)
    logps.sum().backward()
    out[f"after micro-batch {micro}"] = held()
if dist.get_rank() == 0:
    print(json.dumps(out))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes importing torch and transformers: about 20 s on 2 cores
def test_fsdp2_holds_the_unsharded_fp32_gradient_without_sync(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(REPO)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    full_fp32 = mb.FP32 * out["n_params"]
    for micro in (0, 1):  # sync off: the whole model's gradient in fp32 on each of the 2 processes, no shard
        assert out[f"after micro-batch {micro}"] == {"unsharded": {"torch.float32": full_fp32}, "sharded": {}}
    last = out["after micro-batch 2"]  # synced: reduce-scattered into fp32 shards, the unsharded one freed
    assert last["unsharded"] == {}
    assert list(last["sharded"]) == ["torch.float32"]
    assert last["sharded"] == {"torch.float32": full_fp32 // 2}  # every dim 0 here is even: no padding


def test_memory_md_holds_the_default_table():
    text = mb.render()
    memory_md = (REPO / "bench" / "MEMORY.md").read_text()
    assert text in memory_md, "bench/MEMORY.md is stale: rerun python bench/memory_budget.py --output bench/MEMORY.md"


def test_output_replaces_only_the_generated_part(tmp_path, capsys):
    path = tmp_path / "MEMORY.md"
    begin, end = mb.MARKERS
    path.write_text(f"# prose above\n{begin}old table\n{end}prose below\n")
    mb.main(["--output", str(path), "--gradient_checkpointing", "on", "--grad_sync", "every"])
    text = path.read_text()
    assert text.startswith(f"# prose above\n{begin}P = 7,615,616,512 parameters")
    assert text.endswith(f"headroom 68.7%.\n{end}prose below\n")
    assert "old table" not in text and text.count("| term | formula |") == 1
    assert capsys.readouterr().out in text
