"""Every preference format TRL reads, as it is (SPEC §5 plus TRL's formats): the UltraFeedback-binarized schema
(prompt string, whole conversations), plain strings, a conversational prompt (system and earlier turns allowed)
with the assistant turn(s) as replies, and an implicit prompt (no 'prompt': the shared start of chosen and
rejected). A file's format is decided by its first row; a row that fits it not is one line naming file, row and
field. The same pairs in every format give the same tokens, and train to the same weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

import common
import dpo


def in_format(row: dict, fmt: str) -> dict:
    """A row of data/tiny (UltraFeedback-binarized) written in another format."""
    prompt, chosen, rejected = row["chosen"][:-1], row["chosen"][-1:], row["rejected"][-1:]
    scores = {k: row[k] for k in ("score_chosen", "score_rejected") if k in row}
    if fmt == "ultrafeedback":
        return row
    if fmt == "strings":
        return {"prompt": row["prompt"], "chosen": chosen[0]["content"], "rejected": rejected[0]["content"]} | scores
    if fmt == "conversational":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected} | scores
    return {"chosen": prompt + chosen, "rejected": prompt + rejected} | scores  # implicit prompt


FORMATS = ["ultrafeedback", "strings", "conversational", "implicit"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokens(rows, source="mem"):
    examples = common.parse_rows(list(enumerate(rows, 1)), source)
    pairs, _ = common.tokenize_pairs(examples, common.build_tiny_tokenizer(), 2048, 1800)
    return pairs


def tiny_rows(n):
    return [json.loads(line) for line in (common.TINY_DATA_DIR / "train.jsonl").read_text().splitlines()[:n]]


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_same_pairs_give_the_same_tokens_in_every_format(fmt):
    rows = tiny_rows(20)
    assert tokens([in_format(r, fmt) for r in rows]) == tokens(rows)


def test_conversational_prompt_keeps_system_and_earlier_turns():
    history = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Say in lower case: Red Sun"},
    ]
    good, bad = [{"role": "assistant", "content": "red sun"}], [{"role": "assistant", "content": "RED SUN"}]
    rows = {
        "ultrafeedback": {"prompt": "Say in lower case: Red Sun", "chosen": history + good, "rejected": history + bad},
        "conversational": {"prompt": history, "chosen": good, "rejected": bad},
        "implicit": {"chosen": history + good, "rejected": history + bad},
    }
    pairs = {fmt: tokens([row]) for fmt, row in rows.items()}
    assert pairs["conversational"] == pairs["ultrafeedback"] == pairs["implicit"]
    prompt = common.build_tiny_tokenizer().decode(pairs["implicit"][0].prompt_ids)
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")


def test_multi_turn_replies_are_the_completion():
    """A reply of several assistant turns (a tool call and its answer, say) is one completion."""
    reply = [
        {"role": "assistant", "content": "Let me look."},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    row = {"prompt": [{"role": "user", "content": "What is it?"}], "chosen": reply, "rejected": reply[:1]}
    (pair,) = tokens([row])
    text = common.build_tiny_tokenizer().decode(pair.chosen_ids)
    assert (
        text == "Let me look.<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\nIt is 42.<|im_end|>\n"
    )


USER = {"role": "user", "content": "q"}
A, B = {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}


@pytest.mark.parametrize(
    "first, bad, message",
    [
        (
            {"prompt": [USER], "chosen": [A], "rejected": [B]},
            {"prompt": "q", "chosen": [A], "rejected": [B]},
            "field 'prompt': expected a non-empty list of {role, content} messages",
        ),
        (
            {"prompt": [USER], "chosen": [A], "rejected": [B]},
            {"prompt": [USER], "chosen": [USER, A], "rejected": [B]},
            "field 'chosen': the reply must start and end with an assistant message, found role 'user'",
        ),
        (
            {"prompt": [USER], "chosen": [A], "rejected": [B]},
            {"prompt": [USER], "chosen": [A], "rejected": [A, USER]},
            "field 'rejected': the reply must start and end with an assistant message, found role 'user'",
        ),
        (
            {"chosen": [USER, A], "rejected": [USER, B]},
            {"chosen": [USER, A], "rejected": [{"role": "user", "content": "x"}, B]},
            "fields 'chosen' and 'rejected' start from different conversations",
        ),
        (
            {"chosen": [USER, A], "rejected": [USER, B]},
            {"chosen": [USER, A], "rejected": [USER, A]},
            "fields 'chosen' and 'rejected' do not differ after their shared start",
        ),
        (
            {"chosen": [USER, A], "rejected": [USER, B]},
            {"chosen": [USER, A, USER, A], "rejected": [USER, A, USER, B]},
            None,
        ),  # multi-turn conversations share their start up to the last reply: fine
        (
            {"chosen": [USER, A], "rejected": [USER, B]},
            {"prompt": "q", "chosen": [USER, A], "rejected": [USER, B]},
            "field 'prompt' is here, but the file's first row has none (implicit prompt)",
        ),
        (
            {"chosen": [USER, A], "rejected": [USER, B]},
            {"chosen": "a", "rejected": [USER, B]},
            "field 'chosen': expected a non-empty list of {role, content} messages",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": [USER], "chosen": "a", "rejected": "b"},
            "field 'prompt' must be a non-empty string, as in the file's first row",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"chosen": "a", "rejected": "b"},
            "field 'prompt' is missing",
        ),
    ],
)
def test_a_row_that_fits_the_files_format_not_is_one_line(tmp_path, first, bad, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [first, bad])
    if message is None:
        common.parse_rows(common.read_rows(path), str(path))
        return
    with pytest.raises(common.InputError) as error:
        common.parse_rows(common.read_rows(path), str(path))
    assert str(error.value) == f"{path}: row 2: {message}"


def test_every_format_trains_to_the_same_weights(tmp_path):
    """The first 64 pairs of data/tiny in each format, fp32, one process: the same weights, bit for bit."""
    rows = tiny_rows(64)
    test_file = common.TINY_DATA_DIR / "test.jsonl"
    flags = ["--global_batch_size", "16", "--micro_batch_size", "8", "--num_epochs", "1", "--max_test_samples", "16"]
    for fmt in FORMATS:
        data = write_jsonl(tmp_path / f"{fmt}.jsonl", [in_format(r, fmt) for r in rows])
        argv = ["--model", "tiny", "--data", str(data), "--test_data", str(test_file), *flags, "--save_steps", "0"]
        argv += ["--output_dir", str(tmp_path / fmt), "--ref_cache_dir", str(tmp_path / "refs")]
        common.train(common.parse_args(dpo.Args, argv), dpo.loss_fn, True, "dpo")
    reference = load_file(tmp_path / "ultrafeedback" / "model.safetensors")
    initial = common.build_tiny_model(common.build_tiny_tokenizer(), seed=42).state_dict()
    assert not torch.equal(reference["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    for fmt in FORMATS[1:]:
        weights = load_file(tmp_path / fmt / "model.safetensors")
        assert all(torch.equal(weights[name], reference[name]) for name in reference), fmt
