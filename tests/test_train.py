"""End-to-end training on the embedded tiny default: every method learns (held-out reward accuracy from about 0.5
to at least 0.9) and writes a Hugging Face folder; reference log-probs are cached and reused, and never computed
for a reference-free loss; 2 FSDP processes on gloo end with the same weights as 1 process, and gammaPO's margins
agree across them; a run interrupted after a checkpoint and resumed ends with the same weights as an uninterrupted
one, gammaPO's gap history included."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import alphapo
import apo_hinge_zero
import apo_zero
import common
import dpo
import gammapo
import ipo
import margin_sigmoid
import simpo

SMALL = ["--max_train_samples", "64", "--global_batch_size", "16", "--micro_batch_size", "4", "--num_epochs", "1"]


def run(tmp_path, name, extra=(), method=dpo, loss_fn=None, needs_reference=None, ref_cache=None):
    """`python <method>.py --model tiny ...extra`, in this process."""
    ref_cache = ref_cache or tmp_path / "refs"
    argv = ["--model", "tiny", "--output_dir", str(tmp_path / name), "--ref_cache_dir", str(ref_cache), *extra]
    needs_reference = method.NEEDS_REFERENCE if needs_reference is None else needs_reference
    args = common.parse_args(method.Args, argv)
    return common.train(
        args, loss_fn or method.loss_fn, needs_reference, method.__name__, getattr(method, "LOSS_STATE", None)
    )


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_learns_and_reuses_reference(tmp_path, capsys):
    result = run(tmp_path, "run")
    log = capsys.readouterr().out
    first = metrics(tmp_path / "run")[0]
    assert first["step"] == 0 and first["eval/reward_accuracy"] == 0.5  # policy = reference: every pair ties
    assert result["eval/reward_accuracy"] >= 0.9
    run_record = json.loads((tmp_path / "run" / "args.json").read_text())
    assert_common_held_out_metrics(first, result, run_record)
    assert run_record["reply_score"] > 0.8  # DPO's replies follow the request (0.89 measured; untrained: 0.49)
    assert "reference log-probs (train): computed 1600 pairs" in log
    assert len(list((tmp_path / "refs").glob("*.pt"))) == 2  # train and held-out

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert tokenizer.chat_template == common.TINY_CHAT_TEMPLATE
    initial = common.build_tiny_model(common.build_tiny_tokenizer(), seed=42)
    assert not torch.equal(model.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["beta"] == 0.01
    assert not (tmp_path / "run" / "checkpoint").exists()

    # Same model and data, other training flags: the cached reference is reused, not recomputed.
    run(tmp_path, "again", ["--num_epochs", "1", "--learning_rate", "1e-4"])
    log = capsys.readouterr().out
    assert "reference log-probs (train): reusing cache" in log and "computed" not in log

    # Another seed is another random tiny model: its own reference, not the cached one of seed 42.
    run(tmp_path, "seed7", ["--seed", "7", *SMALL])
    log = capsys.readouterr().out
    assert "reference log-probs (held-out): computed 200 pairs" in log
    assert metrics(tmp_path / "seed7")[0]["eval/reward_accuracy"] == 0.5
    assert len(list((tmp_path / "refs").glob("*.pt"))) == 4


def test_reference_cache_key_follows_the_initial_weights(tmp_path):
    """The tiny model changes with --seed; a local folder trained again keeps its name but not its weights."""
    weights_id = common.initial_weights_id
    assert weights_id(common.TrainArgs(model="tiny", seed=1)) != weights_id(common.TrainArgs(model="tiny", seed=2))
    assert weights_id(common.TrainArgs(model="org/name", seed=1)) == weights_id(common.TrainArgs(model="org/name"))
    tokenizer = common.build_tiny_tokenizer()
    common.build_tiny_model(tokenizer, seed=1).save_pretrained(tmp_path / "sft")
    before = weights_id(common.TrainArgs(model=str(tmp_path / "sft")))
    assert before == weights_id(common.TrainArgs(model=str(tmp_path / "sft" / "..") + "/sft", seed=5))
    common.build_tiny_model(tokenizer, seed=2).save_pretrained(tmp_path / "sft")
    assert weights_id(common.TrainArgs(model=str(tmp_path / "sft"))) != before


@pytest.mark.parametrize("method", [ipo, simpo, apo_zero, apo_hinge_zero, margin_sigmoid, gammapo, alphapo])
def test_every_method_learns_on_the_tiny_default(method, tmp_path, tmp_path_factory):
    """`python <method>.py --model tiny --data tiny` with its own defaults (dpo.py: the test above)."""
    result = run(
        tmp_path, method.__name__, ["--data", "tiny"], method, ref_cache=tmp_path_factory.getbasetemp() / "refs"
    )
    first = metrics(tmp_path / method.__name__)[0]
    assert 0.4 <= first["eval/reward_accuracy"] <= 0.6
    assert result["eval/reward_accuracy"] >= 0.9
    args = json.loads((tmp_path / method.__name__ / "args.json").read_text())
    assert args["learning_rate"] == common.TINY_DEFAULTS["learning_rate"]
    assert_common_held_out_metrics(first, result, args)
    if method is gammapo:  # the spread of its margins γ_i, every step, around γ0 = gamma_beta_ratio · β
        steps = [r for r in metrics(tmp_path / "gammapo") if "loss" in r]
        gamma0 = args["gamma_beta_ratio"] * args["beta"]
        assert all(r["gamma_i/min"] <= r["gamma_i/mean"] <= r["gamma_i/max"] for r in steps)
        assert all(r["gamma_i/min"] < r["gamma_i/max"] for r in steps)
        means = [r["gamma_i/mean"] for r in steps]
        assert 0.5 * gamma0 < min(means) and max(means) < 2 * gamma0


def assert_common_held_out_metrics(first, last, args):
    """The metrics that mean the same for every method, at step 0 (policy = π_0) and at the end; and the
    generated-reply score of the trained model (how far above 0.5 depends on the method: see robustness.py)."""
    common_keys = [key for key in first if key.startswith(("eval/log_ratio", "eval/avg_logp", "eval/logp_per"))]
    assert len(common_keys) == 6 and all(key in last for key in common_keys)
    assert first["eval/log_ratio_accuracy"] == 0.5  # every pair ties
    assert first["eval/logp_per_token_change/chosen"] == first["eval/logp_per_token_change/rejected"] == 0
    assert last["eval/log_ratio_accuracy"] >= 0.9 and last["eval/avg_logp_accuracy"] >= 0.9
    assert last["eval/logp_per_token/chosen"] > last["eval/logp_per_token/rejected"]
    assert 0 <= args["reply_score"] <= 1


def test_reference_free_never_computes_reference_for_training(tmp_path, monkeypatch):
    def length_normalised_loss(lp, args):
        assert lp.ref_chosen is None and lp.ref_rejected is None
        chosen, rejected = lp.chosen / lp.chosen_len, lp.rejected / lp.rejected_len
        return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()

    initial_logps = common.reference_logps

    def held_out_only(policy, pairs, args, pad_id, device, name):
        assert name == "held-out", "reference log-probs of the training pairs requested by a reference-free run"
        return initial_logps(policy, pairs, args, pad_id, device, name)  # π_0 of the common held-out metrics

    monkeypatch.setattr(common, "reference_logps", held_out_only)
    run(tmp_path, "free", SMALL, simpo, loss_fn=length_normalised_loss)
    assert len(list((tmp_path / "refs").glob("*.pt"))) == 1
    assert (tmp_path / "free" / "model.safetensors").is_file()


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(folder, refs, *extra):
    return [str(common.REPO_DIR / "dpo.py"), "--model", "tiny", *SMALL, "--learning_rate", "1e-3"] + [
        "--output_dir",
        str(folder),
        "--ref_cache_dir",
        str(refs),
        *extra,
    ]


def two_nodes(train_args, cwds=(None, None)):
    """torchrun --nnodes 2 --nproc_per_node 1, one launch per node on 127.0.0.1, one rendezvous."""
    port = free_port()
    launches = [
        subprocess.Popen(
            [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank)]
            + ["--master_addr", "127.0.0.1", "--master_port", str(port), *train_args],
            cwd=cwd or common.REPO_DIR,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, cwd in enumerate(cwds)
    ]
    return [(p.wait(timeout=300), *p.communicate()) for p in launches]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one") / "run"
    result = subprocess.run(
        [sys.executable, *train_command(folder, folder.parent / "refs")], env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.mark.parametrize(
    "launch",
    ["2 processes, sync every micro-batch", "2 processes, sync once per step", "2 nodes x 1 process"],
)
def test_distributed_runs_match_one_process(one_process, tmp_path, launch):
    """Same global batch of 16: 1 process accumulates 4 micro-batches of 4, 2 processes 2 each, sharded by FSDP2,
    with gradients reduce-scattered after every micro-batch (the default) or once per step; and 2 nodes of one
    process each, where both processes are LOCAL_RANK 0 and only RANK 0 writes."""
    folder = tmp_path / "run"
    args = train_command(folder, tmp_path / "refs")
    if launch.startswith("2 nodes"):
        (code, out, err), (code1, _, err1) = two_nodes(args)
        assert code == code1 == 0, err[-3000:] + err1[-3000:]
    else:
        sync = ["--gradient_sync", "step"] if "per step" in launch else []
        command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *args, *sync]
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        out = result.stdout
    assert "(2 x 2 x 4)" in out
    weights_one, weights_two = load_file(one_process / "model.safetensors"), load_file(folder / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    initial = common.build_tiny_model(common.build_tiny_tokenizer(), seed=42).state_dict()
    for name in weights_one:
        assert not torch.equal(weights_one[name], initial[name]) or "norm" in name, name  # training moved it
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-5, msg=name)
    loss_one = [m["loss"] for m in metrics(one_process)[1:]]
    loss_two = [m["loss"] for m in metrics(folder)[1:]]
    assert loss_one == pytest.approx(loss_two, rel=1e-5)


def test_a_node_that_cannot_see_the_output_folder_stops_every_rank(tmp_path):
    """Two nodes whose --output_dir is relative to a different working folder: rank 1 does not see rank 0's folder,
    as on a node without the shared file system. Both stop before any work, rank 0 says which rank in one line."""
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    args = [str(common.REPO_DIR / "dpo.py"), "--model", "tiny", "--output_dir", "out", "--ref_cache_dir", "refs"]
    (code0, _, err0), (code1, _, _) = two_nodes(args, cwds=(tmp_path / "node0", tmp_path / "node1"))
    assert code0 != 0 and code1 != 0
    lines = [line for line in err0.splitlines() if line.startswith("dpo: error:")]
    assert len(lines) == 1  # (torchrun then prints its own report of the failed worker)
    assert f"rank 1 on {socket.gethostname()} cannot see --output_dir out as rank 0 does" in lines[0]
    assert "must be on a file system every node shares" in lines[0]
    assert not (tmp_path / "node0" / "out" / "metrics.jsonl").exists()


def test_bf16_two_processes_learn_and_save_bf16(tmp_path):
    """--precision bf16 on CPU runs the GPU path: FSDP2 MixedPrecisionPolicy (bf16 compute, fp32 reduction over
    fp32 master weights), the bf16 branch of the chunked LM head, and a bf16 save that transformers loads."""
    folder = tmp_path / "run"
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(common.REPO_DIR / "dpo.py"), "--model", "tiny"]
    command += ["--precision", "bf16", "--max_train_samples", "384", "--max_test_samples", "64"]  # 24 steps
    command += ["--output_dir", str(folder), "--ref_cache_dir", str(tmp_path / "refs")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(folder)
    assert records[0]["eval/reward_accuracy"] == 0.5 and records[-1]["eval/reward_accuracy"] >= 0.8  # 0.89 measured
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.bfloat16}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16


def test_gammapo_margins_agree_across_two_processes(tmp_path):
    """torchrun --nproc_per_node 2 gammapo.py: both ranks solve the same problem (every rank's gaps, then the same
    sampled history) at every micro-step, get the same margins, and each uses its own slice of them."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(common.REPO_DIR / "tests" / "record_margins.py"), "--model", "tiny", *SMALL]
    command += ["--output_dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=common.REPO_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"margins_rank{r}.pt") for r in range(2)]
    assert len(ranks[0]["solves"]) == 4 * 2  # 4 steps x 2 micro-batches of 4 pairs per rank
    for (gaps0, margins0), (gaps1, margins1) in zip(ranks[0]["solves"], ranks[1]["solves"]):
        assert torch.equal(gaps0, gaps1) and torch.equal(margins0, margins1)
    for step, (gaps, margins) in enumerate(ranks[0]["solves"]):
        assert len(gaps) == min(8 * (step + 1), 256)  # 2 ranks x 4 current gaps + every past one (fewer than 248)
        for r in range(2):
            local_gaps, local_margins = ranks[r]["used"][step]
            torch.testing.assert_close(local_gaps.double(), gaps[4 * r : 4 * r + 4], rtol=0, atol=0)
            torch.testing.assert_close(local_margins, margins[4 * r : 4 * r + 4].float(), rtol=0, atol=0)
    assert not torch.equal(ranks[0]["used"][-1][1], ranks[1]["used"][-1][1])  # different pairs, different margins


@pytest.mark.parametrize("method", [dpo, gammapo])
def test_resume_matches_uninterrupted(tmp_path, monkeypatch, method):
    flags = [
        "--max_train_samples",
        "96",
        "--global_batch_size",
        "16",
        "--micro_batch_size",
        "8",
        "--num_epochs",
        "2",
        "--save_steps",
        "4",
    ]  # 12 steps over 2 epochs, checkpoints at 4 and 8
    run(tmp_path, "straight", flags, method)

    save = common.save_checkpoint

    def save_then_crash(output_dir, policy, trainer, step, loss_state, record):
        save(output_dir, policy, trainer, step, loss_state, record)
        if step == 8:
            raise KeyboardInterrupt  # as if the job were killed right after its second checkpoint

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", flags, method)
    monkeypatch.setattr(common, "save_checkpoint", save)
    with pytest.raises(common.InputError, match="already holds a checkpoint: pass --resume"):
        run(tmp_path, "resumed", flags, method)
    run(tmp_path, "resumed", [*flags, "--resume"], method)

    straight, resumed = (
        load_file(tmp_path / "straight" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == list(range(13))
    assert [m["loss"] for m in metrics(tmp_path / "resumed")[1:]] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "straight")[1:]], rel=1e-6
    )


def test_resume_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(common.InputError, match="--resume: no checkpoint in .*; run without --resume"):
        run(tmp_path, "nothing", [*SMALL, "--resume"])
