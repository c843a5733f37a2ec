"""One yardstick for every method: held-out metrics that do not depend on the method's own reward, and the tiny
task's generated-reply score (0.5 for a model that ignores the request, 1.0 for one that follows it)."""

import json

import pytest
import torch.distributed as dist

import alphapo
import common
import dpo
import eval as evaluation
import gammapo
import ipo
import simpo

COMMON = (
    "eval/log_ratio_accuracy",
    "eval/avg_logp_accuracy",
    "eval/logp_per_token/chosen",
    "eval/logp_per_token/rejected",
    "eval/logp_per_token_change/chosen",
    "eval/logp_per_token_change/rejected",
)
SMALL = ["--max_train_samples", "64", "--global_batch_size", "16", "--micro_batch_size", "4", "--num_epochs", "1"]


def held_out_metrics(folder, method, initial):
    """common.evaluate of the model saved in folder, judged by method's loss, against the initial log-probs."""
    args = common.parse_args(method.Args, ["--model", str(folder), "--data", "tiny", "--max_test_samples", "48"])
    _, _, device = common.setup_distributed()
    try:
        tokenizer = common.load_tokenizer(str(folder))
        _, test_pairs, _ = common.prepare_data(args, tokenizer)
        policy = common.shard_model(common.load_model(str(folder), tokenizer), args, device)
        if initial is None:  # the model in folder is the initial model: its own log-probs are π_0's, computed
            # in batches of the same size as evaluate's, as a run computes its reference (else rounding breaks ties)
            batch_size, pad_id = 2 * args.micro_batch_size, tokenizer.pad_token_id
            initial = common.all_pairs_logps(policy, test_pairs, batch_size, pad_id, device, "π_0")[:, :2]
        loss_state = getattr(method, "LOSS_STATE", None)
        run_method = common.Method(method.__name__, method.loss_fn, method.NEEDS_REFERENCE, loss_state)
        run = common.Run(args, run_method, folder, device, policy, tokenizer, [], test_pairs, None, initial, {})
        return initial, common.evaluate(run)
    finally:
        dist.destroy_process_group()


def test_common_metrics_do_not_depend_on_the_method(tmp_path):
    tokenizer = common.build_tiny_tokenizer()
    common.build_tiny_model(tokenizer, seed=42).save_pretrained(tmp_path / "initial")
    tokenizer.save_pretrained(tmp_path / "initial")
    initial, at_start = held_out_metrics(tmp_path / "initial", dpo, None)
    assert at_start["eval/log_ratio_accuracy"] == 0.5  # policy = π_0: every pair ties
    assert at_start["eval/logp_per_token_change/chosen"] == at_start["eval/logp_per_token_change/rejected"] == 0

    flags = ["--model", "tiny", "--output_dir", str(tmp_path / "dpo"), "--ref_cache_dir", str(tmp_path / "refs")]
    common.train(common.parse_args(dpo.Args, flags + SMALL), dpo.loss_fn, True, "dpo", None)

    by_method = {m.__name__: held_out_metrics(tmp_path / "dpo", m, initial)[1] for m in (dpo, ipo, simpo, alphapo)}
    by_method["gammapo"] = held_out_metrics(tmp_path / "dpo", gammapo, initial)[1]
    trained = by_method["dpo"]
    assert trained["eval/log_ratio_accuracy"] != 0.5 and trained["eval/logp_per_token_change/chosen"] != 0
    for name, metrics in by_method.items():
        assert {key: metrics[key] for key in COMMON} == {key: trained[key] for key in COMMON}, name
    # ... while each method's own held-out metrics are its own
    assert len({round(m["eval/loss"], 6) for m in by_method.values()}) == len(by_method)
    # the average log-prob accuracy is what a reference-free method like SimPO calls its reward accuracy
    assert trained["eval/avg_logp_accuracy"] == by_method["simpo"]["eval/reward_accuracy"]
    assert trained["eval/log_ratio_accuracy"] == by_method["dpo"]["eval/reward_accuracy"]


@pytest.mark.parametrize(
    "prompt, reply, score",
    [
        ("Shout these words: River Dream", "RIVER DREAM", 1.0),
        ("Shout these words: River Dream", "river dream", 0.0),
        ("Shout these words: River Dream", "River DREAM", 0.75),  # Title is neither case: half
        ("Whisper these words: River Dream", "river DREAM, 42", 0.5),  # "42" is not a word
        ("Write in small letters: Night", "", 0.5),
        ("Say in UPPER case: Night", "NIGHT night NIGHT NIGHT", 0.75),
    ],
)
def test_case_score_by_hand(prompt, reply, score):
    assert evaluation.case_score(prompt, reply) == score


def rewrite(prompt: str, case: str) -> str:
    words = prompt.split(":", 1)[1].split()
    return " ".join(w.upper() if case == "upper" else w.lower() for w in words)


@pytest.fixture(scope="module")
def held_out_prompts():
    return [json.loads(line)["prompt"] for line in (common.TINY_DATA_DIR / "test.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "answer, low, high",
    [
        (lambda p: rewrite(p, evaluation.asked_case(p)), 1.0, 1.0),  # follows the request
        (lambda p: rewrite(p, "upper"), 0.5, 0.5),  # ignores it: always capitals
        (lambda p: rewrite(p, "lower"), 0.5, 0.5),
        (lambda p: p.split(":", 1)[1].strip(), 0.5, 0.5),  # copies the words as given (Title case)
        (lambda p: rewrite(p, "upper" if len(p) % 2 else "lower"), 0.4, 0.6),  # a case unrelated to the request
    ],
)
def test_reply_score_is_one_when_followed_and_half_when_ignored(held_out_prompts, monkeypatch, answer, low, high):
    """Stand-in models, through tiny_reply_score's own path: only the generation is replaced."""
    monkeypatch.setattr(evaluation, "hf_generator", lambda args: lambda prompts, first: [answer(p) for p in prompts])
    score, rows = evaluation.tiny_reply_score("unused", held_out_prompts)
    assert low <= score <= high
    assert len(rows) == len(held_out_prompts) and {"instruction", "output", "score"} <= set(rows[0])


def test_untrained_model_scores_about_half(tmp_path, held_out_prompts):
    """A random tiny model cannot read the request: its replies' case is unrelated to it."""
    tokenizer = common.build_tiny_tokenizer()
    common.build_tiny_model(tokenizer, seed=0).save_pretrained(tmp_path / "random")
    tokenizer.save_pretrained(tmp_path / "random")
    score, _ = evaluation.tiny_reply_score(str(tmp_path / "random"), held_out_prompts)
    assert 0.45 <= score <= 0.55
