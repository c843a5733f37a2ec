"""Data loading and bad input: every malformed row or flag fails before training with one line naming the file,
row and field; the chat-template tokenization and truncation follow the rules in common.tokenize_pairs."""

import json
import subprocess
import sys

import pytest

import common

REPO = common.REPO_DIR


def good_row(prompt="Say hi", chosen="hi", rejected="bye"):
    return {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples(rows, source="mem"):
    """Rows as read from a file, checked: row n is the file's row n."""
    return common.parse_rows(list(enumerate(rows, 1)), source)


def tokenize(rows, tokenizer, args=None):
    args = args or common.TrainArgs()
    return common.tokenize_pairs(examples(rows), tokenizer, args.max_length, args.max_prompt_length)


def select_and_flip(rows, source, args):
    return common.select_and_flip(examples(rows, source), args.select_frac, args.flip_frac, args.seed)


BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "field 'prompt' is missing"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "field 'prompt' must be a non-empty string"),
    ({"prompt": ["x"], "chosen": "a", "rejected": "b"}, "field 'prompt' must be a non-empty string"),
    ({"prompt": "p", "rejected": "b"}, "field 'chosen' is missing"),
    ({"prompt": "p", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "field 'chosen': empty reply"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "field 'rejected': expected a non-empty string or list"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, "field 'chosen': expected a non-empty string or list"),
    ({**good_row(), "chosen": [{"role": "user", "content": "p"}]}, "field 'chosen': the last message must be"),
    (
        {**good_row(), "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": " "}]},
        "field 'rejected': empty assistant reply",
    ),
    (
        {**good_row(), "chosen": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        "field 'chosen': message 0 needs a string 'content'",
    ),
    (
        {**good_row(), "chosen": [{"content": "p"}, {"role": "assistant", "content": "a"}]},
        "field 'chosen': message 0 needs a string 'role'",
    ),
    (
        {**good_row(), "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
        "start from different conversations",
    ),
]


@pytest.mark.parametrize("bad_row, message", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tmp_path, tiny, bad_row, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [good_row(), good_row(), bad_row, good_row()])
    with pytest.raises(common.InputError) as error:
        common.parse_rows(common.read_rows(path), str(path))
    assert str(error.value).startswith(f"{path}: row 3: ")
    assert message in str(error.value)


def test_broken_json_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good_row()) + "\n{not json\n")
    with pytest.raises(common.InputError, match=r"prefs.jsonl: row 2: not valid JSON"):
        common.read_rows(path)


def test_unknown_data_path_and_model(tmp_path):
    with pytest.raises(common.InputError, match="data file not found"):
        common.load_data(common.TrainArgs(data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(common.InputError, match="could not load data set 'no-such-org/no-such-data'"):
        common.load_data(common.TrainArgs(data="no-such-org/no-such-data"))
    with pytest.raises(common.InputError, match="is not a model folder"):
        common.load_tokenizer(str(tmp_path))
    with pytest.raises(common.InputError, match="could not load model 'no-such-org/no-such-model'"):
        common.load_tokenizer("no-such-org/no-such-model")


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (dict(global_batch_size=128, micro_batch_size=3), 1, "not a multiple of --micro_batch_size 3 x 1"),
        (dict(global_batch_size=12, micro_batch_size=4), 2, "not a multiple of --micro_batch_size 4 x 2"),
        (dict(max_length=512, max_prompt_length=512), 1, "--max_prompt_length 512 must be smaller"),
        (dict(micro_batch_size=0), 1, "--micro_batch_size must be at least 1"),
    ],
)
def test_bad_flags(overrides, world, message):
    with pytest.raises(common.InputError, match=message):
        common.check_args(common.TrainArgs(**overrides), world)


def test_cli_error_is_one_line(tmp_path):
    """The script itself prints one line and exits 2, before any training, with no traceback."""
    path = write_jsonl(tmp_path / "prefs.jsonl", [good_row(), {"prompt": "p", "chosen": "a"}])
    result = subprocess.run(
        [sys.executable, "dpo.py", "--model", "tiny", "--data", str(path), "--output_dir", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"dpo: error: {path}: row 2: field 'rejected' is missing"
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_tokenization_uses_the_chat_template(tiny):
    """Prompt = template with the generation prompt; completion = the rest of the conversation; no extra BOS/EOS."""
    tokenizer = tiny[1]
    pairs, dropped = tokenize([good_row("Q?", "yes", "no")], tokenizer)
    (pair,) = pairs
    assert dropped == 0
    assert tokenizer.decode(pair.prompt_ids) == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(pair.chosen_ids) == "yes<|im_end|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "no<|im_end|>\n"


def test_plain_string_replies(tiny):
    """chosen/rejected as plain strings: the prompt becomes one user turn."""
    row = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    (pair,), _ = tokenize([row], tiny[1])
    assert tiny[1].decode(pair.prompt_ids + pair.chosen_ids) == (
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    )


def test_truncation_keeps_prompt_end_and_cuts_completion(tiny):
    tokenizer = tiny[1]
    args = common.TrainArgs(max_length=30, max_prompt_length=20)
    (pair,), _ = tokenize([good_row("x" * 50, "y" * 40, "z")], tokenizer, args)
    assert len(pair.prompt_ids) == 20
    assert tokenizer.decode(pair.prompt_ids).endswith("x<|im_end|>\n<|im_start|>assistant\n")
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 30 and tokenizer.decode(pair.chosen_ids) == "y" * 10
    assert tokenizer.decode(pair.rejected_ids) == "z<|im_end|>\n"


def test_empty_completion_is_dropped_and_counted():
    """A template that renders no completion for a reply leaves nothing to score: the pair is dropped and counted."""
    tokenizer = common.build_tiny_tokenizer()
    tokenizer.chat_template = common.TINY_CHAT_TEMPLATE.replace(
        "{%- for message in messages %}", "{%- for message in messages if message['content'] != 'SKIP' %}"
    ).replace("if add_generation_prompt", "if add_generation_prompt or messages[-1]['content'] == 'SKIP'")
    rows = [good_row(), good_row(chosen="SKIP"), good_row()]
    pairs, dropped = tokenize(rows, tokenizer)
    assert (len(pairs), dropped) == (2, 1)


def test_local_file_holds_out_five_percent(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [good_row(f"p{i}") for i in range(100)])
    train, _, test, _ = common.load_data(common.TrainArgs(data=str(path)))
    assert (len(train), len(test)) == (95, 5)
    assert {r.prompt[0]["content"] for r in train}.isdisjoint(r.prompt[0]["content"] for r in test)


def test_tiny_data_is_well_formed(tiny):
    train, train_source, test, test_source = common.load_data(common.TrainArgs(data="tiny", max_test_samples=None))
    assert (len(train), len(test)) == (1600, 200)
    pairs, dropped = common.tokenize_pairs(train, tiny[1], 2048, 1800)
    assert dropped == 0 and len(pairs) == 1600


# ---- --select_frac and --flip_frac ----


def scored_row(i, gap):
    return {**good_row(f"p{i}", f"good {i}", f"bad {i}"), "score_chosen": 5.0 + gap, "score_rejected": 5.0}


def swapped(before, after):
    """Indices of pairs whose chosen and rejected traded places (and nothing else changed)."""
    before = examples(before) if isinstance(before[0], dict) else before
    out = []
    for i, (b, a) in enumerate(zip(before, after)):
        if a != b:
            assert a == b._replace(chosen=b.rejected, rejected=b.chosen, scores=b.scores[::-1])
            out.append(i)
    return out


@pytest.mark.parametrize("flip_frac, n_rows", [(0.1, 1600), (0.25, 7), (0.3, 50), (0.5, 3), (0.999, 10)])
def test_flip_frac_swaps_exactly_round_p_n_pairs(flip_frac, n_rows):
    rows = [scored_row(i, i % 4) for i in range(n_rows)]
    flipped_rows, counts = select_and_flip(rows, "mem", common.TrainArgs(flip_frac=flip_frac, seed=3))
    flipped = swapped(rows, flipped_rows)
    assert len(flipped) == counts["flipped"] == round(flip_frac * n_rows)
    assert rows == [scored_row(i, i % 4) for i in range(n_rows)]  # the caller's rows are left as they were


def test_flip_frac_is_deterministic_for_a_seed():
    rows = [scored_row(i, 1) for i in range(200)]
    flips = {
        seed: swapped(rows, select_and_flip(rows, "mem", common.TrainArgs(flip_frac=0.2, seed=seed))[0])
        for seed in (1, 2)
    }
    again = swapped(rows, select_and_flip(rows, "mem", common.TrainArgs(flip_frac=0.2, seed=1))[0])
    assert again == flips[1] and len(flips[1]) == 40
    assert flips[1] != flips[2]
    no_flip, counts = select_and_flip(rows, "mem", common.TrainArgs())
    assert no_flip == examples(rows) and counts == {"loaded": 200}


def test_select_frac_keeps_the_largest_score_gaps_in_file_order():
    gaps = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    rows = examples([scored_row(i, gap) for i, gap in enumerate(gaps)])
    kept, counts = common.select_and_flip(rows, 0.3, 0.0, 42)
    assert kept == [rows[4], rows[5], rows[7]]  # gaps 9, 6 and the first of the two 5s
    assert counts == {"loaded": 10, "kept": 3}
    kept, _ = common.select_and_flip(rows, 0.5, 0.0, 42)
    assert [gaps[rows.index(r)] for r in kept] == [4, 5, 9, 6, 5]
    both, counts = common.select_and_flip(rows, 0.5, 0.4, 42)
    assert counts == {"loaded": 10, "kept": 5, "flipped": 2}  # flips count the kept pairs
    assert len(swapped(kept, both)) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(flip_frac=-0.1), r"--flip_frac -0.1 must be in \[0, 1\)"),
        (dict(flip_frac=1.0), r"--flip_frac 1.0 must be in \[0, 1\)"),
        (dict(flip_frac=float("nan")), "--flip_frac must be a finite number, got nan"),
        (dict(select_frac=0.0), r"--select_frac 0.0 must be in \(0, 1\]"),
        (dict(select_frac=1.5), r"--select_frac 1.5 must be in \(0, 1\]"),
    ],
)
def test_bad_noise_flags(overrides, message):
    with pytest.raises(common.InputError, match=message):
        common.check_args(common.TrainArgs(**overrides), 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda row: row.pop("score_rejected"), "row 3: field 'score_rejected' is missing; --select_frac ranks"),
        (lambda row: row.update(score_chosen="high"), "row 3: field 'score_chosen' must be a finite number"),
        (lambda row: row.update(score_chosen=float("inf")), "row 3: field 'score_chosen' must be a finite number"),
    ],
)
def test_select_frac_needs_scores(change, message):
    rows = [scored_row(i, 1) for i in range(5)]
    change(rows[2])
    with pytest.raises(common.InputError, match=f"data.jsonl: {message}"):
        select_and_flip(rows, "data.jsonl", common.TrainArgs(select_frac=0.5))
    select_and_flip(rows, "data.jsonl", common.TrainArgs(flip_frac=0.5))  # flipping needs no scores


class Stop(Exception):
    pass


def test_training_flips_only_training_pairs(tmp_path, monkeypatch):
    """Through common.train on a local file with 5% held out: the tokenized training rows have exactly
    round(p x N) pairs swapped, the held-out rows none, and args.json records the counts."""
    rows = [scored_row(i, i % 7) for i in range(200)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    seen = []  # the training pairs, then the held-out ones

    def record(examples, tokenizer, max_length, max_prompt_length):
        seen.append(examples)
        if len(seen) == 2:
            raise Stop
        return [], 0

    monkeypatch.setattr(common, "tokenize_pairs", record)
    argv = ["--model", "tiny", "--data", str(path), "--output_dir", str(tmp_path / "out")]
    args = common.parse_args(common.TrainArgs, [*argv, "--flip_frac", "0.3", "--select_frac", "0.5"])
    with pytest.raises(Stop):
        common.train(args, None, False, "dpo")
    train_original, _, test_original, _ = common.load_data(args)
    train_seen, test_seen = seen
    assert test_seen == test_original and len(test_seen) == 10
    kept, _ = common.select_and_flip(train_original, 0.5, 0.0, 42)
    assert len(kept) == 95 and len(swapped(kept, train_seen)) == round(0.3 * 95)


def test_noise_counts_in_args_json(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [scored_row(i, i % 3) for i in range(64)])
    argv = ["--model", "tiny", "--data", str(path), "--test_data", str(path), "--output_dir", str(tmp_path / "out")]
    argv += ["--global_batch_size", "8", "--micro_batch_size", "8", "--flip_frac", "0.25", "--select_frac", "0.5"]
    argv += ["--max_test_samples", "8"]
    common.train(common.parse_args(common.TrainArgs, argv), lambda lp, args: (lp.chosen - lp.rejected,) * 3, False, "x")
    saved = json.loads((tmp_path / "out" / "args.json").read_text())
    assert saved["flip_frac"] == 0.25 and saved["select_frac"] == 0.5
    assert saved["train_rows"] == {"loaded": 64, "kept": 32, "flipped": 8}


def test_select_frac_without_scores_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [good_row(f"p{i}") for i in range(40)])
    result = subprocess.run(
        [
            sys.executable,
            "dpo.py",
            "--model",
            "tiny",
            "--data",
            str(path),
            "--select_frac",
            "0.5",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"dpo: error: {path}: row 1: field 'score_chosen' is missing; --select_frac ranks pairs by their score gap"
    )


def wrong_case_words(pair: common.Example, field: str) -> int:
    """Words of the reply not in the case the prompt asks for (data/tiny's rule)."""
    from data.tiny.make_tiny import ASK

    case = next(case for case, asks in ASK.items() if pair.prompt[-1]["content"].startswith(tuple(asks)))
    return sum(word.isupper() != (case == "upper") for word in getattr(pair, field)[-1]["content"].split())


def test_tiny_scores_make_large_gaps_cleaner():
    """Judge-noise labels, as in real data: wrong labels (chosen has more wrong-case words than rejected) are
    common among small score gaps and rare among large ones; held-out labels all follow the rule."""
    train, source, test, _ = common.load_data(common.TrainArgs(data="tiny", max_test_samples=None))
    mislabelled = [wrong_case_words(r, "chosen") > wrong_case_words(r, "rejected") for r in train]
    top, _ = common.select_and_flip(train, 0.5, 0.0, 42)
    top_ids = {id(r) for r in top}
    wrong_top = sum(m for r, m in zip(train, mislabelled) if id(r) in top_ids)
    wrong_bottom = sum(mislabelled) - wrong_top
    assert 0.05 < sum(mislabelled) / len(train) < 0.2
    assert wrong_top / 800 < 0.03 and wrong_bottom / 800 > 0.1
    assert all(wrong_case_words(r, "chosen") == 0 < wrong_case_words(r, "rejected") for r in test)
    assert all(r.scores[0] >= r.scores[1] for r in train + test)


def test_tiny_data_is_what_make_tiny_writes(tmp_path, monkeypatch):
    from data.tiny import make_tiny

    monkeypatch.setattr(make_tiny, "__file__", str(tmp_path / "make_tiny.py"))
    make_tiny.main()
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (common.TINY_DATA_DIR / f"{split}.jsonl").read_text()
