"""Nothing silently wrong: a NaN stops the run before it is saved, a resumed run keeps the flags that shape its
result, every numeric flag is checked before any work, dropout is off, held-out pairs seen in training and ignored
'prompt' fields are reported, prompts are cut only when a pair is too long, the reference cache follows a hub
model's revision, models load without remote code, and bad files end in one line naming file and row."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import dpo
import simpo

SMALL = ["--max_train_samples", "64", "--max_test_samples", "16", "--global_batch_size", "16"]
SMALL += ["--micro_batch_size", "8", "--num_epochs", "1"]


def run(tmp_path, name, extra=(), method=dpo, loss_fn=None):
    argv = ["--model", "tiny", "--output_dir", str(tmp_path / name), "--ref_cache_dir", str(tmp_path / "refs")]
    args = common.parse_args(method.Args, [*argv, *SMALL, *extra])
    return common.train(
        args, loss_fn or method.loss_fn, method.NEEDS_REFERENCE, method.__name__, getattr(method, "LOSS_STATE", None)
    )


def strict_json_lines(path):
    def no_nan(name):
        raise AssertionError(f"{name} in {path}")

    return [json.loads(line, parse_constant=no_nan) for line in path.read_text().splitlines()]


# ---- non-finite numbers ----


def test_nan_loss_stops_before_the_weights_change_and_keeps_the_last_checkpoint(tmp_path):
    def nan_at_step_3(lp, args):
        losses, chosen, rejected = dpo.loss_fn(lp, args)
        nan_at_step_3.calls += 1
        return (losses * float("nan") if nan_at_step_3.calls > 1 + 2 * 2 else losses), chosen, rejected

    nan_at_step_3.calls = 0  # 1 held-out call, then 2 micro-batches per step
    with pytest.raises(common.RunStopped) as stopped:
        run(tmp_path, "run", ["--save_steps", "2"], loss_fn=nan_at_step_3)
    message = str(stopped.value)
    assert message.startswith("step 3: loss is nan, so the weights were not updated.")
    assert "the checkpoint of step 2 is kept" in message and "too high a learning rate" in message
    folder = tmp_path / "run"
    assert not (folder / "model.safetensors").exists()
    assert [m["step"] for m in strict_json_lines(folder / "metrics.jsonl")] == [0, 1, 2]
    assert json.loads((folder / "checkpoint" / "args.json").read_text())["learning_rate"] == 1e-3


def test_huge_learning_rate_stops_with_one_line(tmp_path):
    command = [sys.executable, "dpo.py", "--model", "tiny", *SMALL, "--learning_rate", "1e30"]
    command += ["--output_dir", str(tmp_path / "run"), "--ref_cache_dir", str(tmp_path / "refs")]
    result = subprocess.run(command, cwd=common.REPO_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("dpo: stopped:")]
    assert " is nan" in line or " is inf" in line
    assert "Likely cause: too high a learning rate (--learning_rate 1e+30)" in line
    assert not (tmp_path / "run" / "model.safetensors").exists()
    strict_json_lines(tmp_path / "run" / "metrics.jsonl")


def test_nan_flag_is_refused_before_any_work(tmp_path):
    command = [sys.executable, "dpo.py", "--model", "tiny", "--beta", "nan", "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=common.REPO_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "dpo: error: --beta must be a finite number, got nan"
    assert not (tmp_path / "run").exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def step_to_inf(self, *args, **kwargs):  # an update that overflows while loss and gradients were finite
        real_step(self, *args, **kwargs)
        with torch.no_grad():
            next(p for group in self.param_groups for p in group["params"]).fill_(float("inf"))

    monkeypatch.setattr(torch.optim.AdamW, "step", step_to_inf)
    with pytest.raises(common.RunStopped, match="step 1: the weights hold NaN or infinite values, so no checkpoint"):
        run(tmp_path, "run", ["--save_steps", "1"])
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "model.safetensors").exists()


# ---- resumed runs keep their flags ----


class Crash(BaseException):
    pass


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A DPO run stopped right after its checkpoint at step 2, copied fresh for each test."""
    tmp_path = tmp_path_factory.mktemp("interrupted")
    save = common.save_checkpoint

    def save_then_crash(*args):
        save(*args)
        raise Crash

    common.save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            run(tmp_path, "run", ["--save_steps", "2"])
    finally:
        common.save_checkpoint = save
    return tmp_path


@pytest.mark.parametrize(
    "flags, method, message",
    [
        (["--learning_rate", "1e-4"], dpo, "--learning_rate is 0.001 in the run to resume, 0.0001 now"),
        (["--global_batch_size", "8"], dpo, "--global_batch_size is 16 in the run to resume, 8 now"),
        (["--seed", "1"], dpo, "--seed is 42 in the run to resume, 1 now"),
        (["--beta", "0.1"], dpo, "--beta is 0.01 in the run to resume, 0.1 now"),
        (["--data", "data/tiny/train.jsonl"], dpo, "--data is 'tiny' in the run to resume, 'data/tiny/train.jsonl'"),
        ([], simpo, "the run was started by dpo.py, not simpo.py"),
    ],
)
def test_resume_refuses_a_flag_that_shapes_the_result(interrupted, tmp_path, flags, method, message):
    import shutil

    shutil.copytree(interrupted / "run", tmp_path / "run")
    shutil.copytree(interrupted / "refs", tmp_path / "refs")
    with pytest.raises(common.InputError, match=message):
        run(tmp_path, "run", ["--save_steps", "2", "--resume", *flags], method=method)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["learning_rate"] == 1e-3  # untouched


def test_resume_allows_flags_that_only_change_how(interrupted, tmp_path):
    import shutil

    shutil.copytree(interrupted / "run", tmp_path / "run")
    shutil.copytree(interrupted / "refs", tmp_path / "refs")
    flags = ["--save_steps", "3", "--micro_batch_size", "4", "--eval_steps", "1", "--logps_chunk_size", "7"]
    result = run(tmp_path, "run", [*flags, "--resume"])
    assert result["step"] == 4


# ---- flags in range ----


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("max_grad_norm", "-1", r"--max_grad_norm must be at least 0, got -1.0 \(0 turns clipping off\)"),
        ("max_prompt_length", "0", "--max_prompt_length must be at least 1, got 0"),
        ("max_prompt_length", "-4", "--max_prompt_length must be at least 1, got -4"),
        ("max_train_samples", "0", "--max_train_samples must be at least 1, got 0 .leave it out"),
        ("max_train_samples", "-5", "--max_train_samples must be at least 1, got -5"),
        ("warmup_ratio", "5", r"--warmup_ratio 5.0 must be in \[0, 1\]"),
        ("learning_rate", "-1", "--learning_rate must be positive, got -1.0"),
        ("learning_rate", "inf", "--learning_rate must be a finite number, got inf"),
        ("weight_decay", "-0.1", "--weight_decay must be at least 0"),
        ("eval_steps", "-1", "--eval_steps must be at least 0"),
        ("seed", "-3", "--seed must be at least 0"),
        ("beta", "nan", "--beta must be a finite number, got nan"),
    ],
)
def test_out_of_range_flags_fail_before_any_work(tmp_path, monkeypatch, flag, value, message):
    monkeypatch.setattr(common, "load_data", lambda args: pytest.fail("work started"))
    with pytest.raises(common.InputError, match=message):
        run(tmp_path, "run", [f"--{flag}", value])


def test_max_grad_norm_zero_means_no_clipping(tmp_path):
    run(tmp_path, "zero", ["--max_grad_norm", "0", "--save_steps", "0"])
    run(tmp_path, "huge", ["--max_grad_norm", "1e9", "--save_steps", "0"])
    zero, huge = load_file(tmp_path / "zero" / "model.safetensors"), load_file(tmp_path / "huge" / "model.safetensors")
    initial = common.build_tiny_model(common.build_tiny_tokenizer(), seed=42).state_dict()
    assert not torch.equal(zero["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    for name in zero:
        assert torch.equal(zero[name], huge[name]), name


# ---- dropout ----


def test_dropout_is_off_after_loading(tmp_path):
    """A model with dropout 0.1 (attention dropout in Qwen2, nn.Dropout elsewhere): two train-mode forwards agree."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_model(tokenizer, seed=0)
    model.config.attention_dropout = 0.1
    model.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, resid_pdrop=0.1))
    ids = torch.randint(0, 259, (2, 24))
    for model in (common.load_model(str(tmp_path / "qwen"), tokenizer), common.disable_dropout(gpt2)):
        model.train()
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    reloaded = common.load_model(str(tmp_path / "qwen"), common.load_tokenizer(str(tmp_path / "qwen")))
    reloaded.model.layers[0].self_attn.attention_dropout = 0.1  # what from_pretrained alone leaves on
    reloaded.train()
    assert not torch.equal(reloaded(ids).logits, reloaded(ids).logits)  # so the check above could fail


# ---- data: what is reported, what is cut ----


def row(prompt, chosen="yes", rejected="no", user=None):
    user = prompt if user is None else user
    return {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": chosen}],
        "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": rejected}],
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_held_out_pairs_seen_in_training_are_counted(tmp_path, capsys):
    train = [row(f"q{i}") for i in range(40)]
    test = [row("q3"), row("q5", "no", "yes"), row("new"), row("q7", "other"), row("q9")]  # 3 repeat, one swapped
    args = common.TrainArgs(
        data=write_jsonl(tmp_path / "train.jsonl", train), test_data=write_jsonl(tmp_path / "test.jsonl", test)
    )
    args.global_batch_size = 8
    common.prepare_data(args, common.build_tiny_tokenizer())
    assert "warning: 3 of 5 held-out pairs also appear in the training data" in capsys.readouterr().out


def test_ignored_prompt_field_is_reported_once(tmp_path, capsys):
    rows = [row(f"q{i}") for i in range(6)] + [row("what the field says", user="what the messages say")] * 2
    common.parse_rows(list(enumerate(rows, 1)), "prefs.jsonl")
    log = capsys.readouterr().out
    assert log.count("warning") == 1
    assert "prefs.jsonl: in 2 rows the 'prompt' field is none of the user turns in 'chosen'" in log


def test_prompt_is_cut_only_when_the_pair_is_too_long():
    """As the original DPO and SimPO trainers: a pair that fits keeps its whole prompt; a long one keeps the last
    max_prompt_length prompt tokens, then its replies are cut to max_length - max_prompt_length."""
    tokenizer = common.build_tiny_tokenizer()
    examples = common.parse_rows([(1, row("p" * 30, "c" * 5, "r")), (2, row("p" * 30, "c" * 60, "r"))], "mem")
    (fits, long), _ = common.tokenize_pairs(examples, tokenizer, max_length=64, max_prompt_length=8)
    assert tokenizer.decode(fits.prompt_ids).startswith("<|im_start|>user\n" + "p" * 30)  # 54 tokens, all kept
    assert tokenizer.decode(fits.chosen_ids) == "c" * 5 + "<|im_end|>\n"
    assert tokenizer.decode(long.prompt_ids) == "sistant\n"  # the last 8 prompt tokens
    assert len(long.chosen_ids) == 64 - 8 and tokenizer.decode(long.rejected_ids) == "r<|im_end|>\n"


def test_template_that_refuses_a_system_message_names_the_row():
    tokenizer = common.build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
        + common.TINY_CHAT_TEMPLATE
    )
    system = row("hi")
    for field in ("chosen", "rejected"):
        system[field] = [{"role": "system", "content": "be brief"}] + system[field]
    examples = common.parse_rows([(1, row("ok")), (2, system)], "prefs.jsonl")
    with pytest.raises(common.InputError) as error:
        common.tokenize_pairs(examples, tokenizer, 64, 32)
    assert (
        str(error.value) == "prefs.jsonl: row 2: the chat template refused this conversation: System role not supported"
    )


def test_bad_files_end_in_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(common.InputError, match="empty.jsonl: no rows"):
        common.load_data(common.TrainArgs(data=str(tmp_path / "empty.jsonl")))
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(common.InputError, match="fake.parquet: not a readable parquet file"):
        common.load_data(common.TrainArgs(data=str(tmp_path / "fake.parquet")))


def test_score_error_names_the_file_row_after_the_held_out_split(tmp_path):
    rows = [{**row(f"q{i}"), "score_chosen": 8.0, "score_rejected": 2.0} for i in range(80)]
    rows[59]["score_chosen"] = "high"  # file line 60
    args = common.TrainArgs(data=write_jsonl(tmp_path / "prefs.jsonl", rows), select_frac=0.5)
    train, _, test, _ = common.load_data(args)
    assert "prefs.jsonl: row 60" not in [ex.where for ex in test]  # (the held-out part would skip the check)
    with pytest.raises(common.InputError, match=r"prefs.jsonl: row 60: field 'score_chosen' must be a finite"):
        common.select_and_flip(train, 0.5, 0.0, 42)


# ---- what code a model folder may run, and which weights a cache key names ----


def test_models_load_without_remote_code(tmp_path, monkeypatch):
    import transformers

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        real = cls.from_pretrained

        def spy(*args, real=real, cls=cls, **kwargs):
            calls.append((cls.__name__, kwargs.get("trust_remote_code", "not given")))
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    tokenizer = common.load_tokenizer("tiny")
    common.load_model("tiny", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    common.load_model(str(tmp_path), common.load_tokenizer(str(tmp_path)))
    common.load_model(str(tmp_path), tokenizer, empty=True)
    assert {name for name, _ in calls} == {"AutoTokenizer", "AutoModelForCausalLM", "AutoConfig"}
    assert all(value is False for _, value in calls), calls


def test_hub_cache_key_follows_the_revision(tmp_path):
    """A model pushed again under the same hub name resolves to another commit: another reference cache key."""
    repo = tmp_path / "hub" / "models--org--model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    code = "import common; print(common.initial_weights_id(common.TrainArgs(model='org/model')))"
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    ids = []
    for commit in ("a" * 40, "b" * 40):
        (repo / "refs" / "main").write_text(commit)
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=common.REPO_DIR, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        ids.append(result.stdout.strip())
    assert ids == [f"org/model@{'a' * 40}", f"org/model@{'b' * 40}"]
