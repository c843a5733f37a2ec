"""What a run reports besides its model: --report_to sends exactly what metrics.jsonl holds to a tracker (TensorBoard's
event files read back, a resumed run included), a missing tracker package is one line, and the model card
(output_dir/README.md) names the method, the command, the data counts and the held-out metrics at start and end."""

import importlib.util
import json
import subprocess
import sys

import pytest

import common
import dpo

SMALL = ["--max_train_samples", "64", "--max_test_samples", "16", "--global_batch_size", "16"]
SMALL += ["--micro_batch_size", "8", "--num_epochs", "1", "--eval_steps", "2"]


def run(tmp_path, name, extra=()):
    argv = ["--model", "tiny", "--output_dir", str(tmp_path / name), "--ref_cache_dir", str(tmp_path / "refs")]
    return common.train(common.parse_args(dpo.Args, [*argv, *SMALL, *extra]), dpo.loss_fn, True, "dpo")


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder) -> dict:
    """{(tag, step): value} of every scalar in the folder's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def expected_scalars(folder) -> dict:
    return {(k, r["step"]): v for r in metrics(folder) for k, v in r.items() if k != "step"}


def test_tensorboard_holds_what_metrics_jsonl_holds(tmp_path):
    run(tmp_path, "run", ["--report_to", "tensorboard", "--save_steps", "0"])
    scalars, expected = tensorboard_scalars(tmp_path / "run"), expected_scalars(tmp_path / "run")
    assert scalars.keys() == expected.keys() and ("eval/reward_accuracy", 0) in scalars
    assert all(scalars[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())  # float32 events


def test_resumed_run_keeps_one_history_in_tensorboard(tmp_path, monkeypatch):
    """Steps after the checkpoint are trained, and logged, again: TensorBoard drops the first copies."""
    save = common.save_checkpoint

    def save_then_crash(*args):
        save(*args)
        raise KeyboardInterrupt

    flags = ["--report_to", "tensorboard", "--save_steps", "2"]
    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "run", flags)
    monkeypatch.undo()
    run(tmp_path, "run", [*flags, "--resume"])
    scalars, expected = tensorboard_scalars(tmp_path / "run"), expected_scalars(tmp_path / "run")
    assert scalars.keys() == expected.keys()
    assert all(scalars[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_missing_tracker_package_is_one_line(tmp_path, tracker):
    if importlib.util.find_spec(tracker):
        pytest.skip(f"{tracker} is installed here")
    command = [sys.executable, "dpo.py", "--model", "tiny", "--report_to", tracker, "--output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=common.REPO_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"dpo: error: --report_to {tracker} needs the {tracker} package: pip install {tracker}"
    )


def test_model_card_names_method_command_data_and_metrics(tmp_path):
    folder = tmp_path / "card"
    command = ["dpo.py", "--model", "tiny", *SMALL, "--flip_frac", "0.25", "--output_dir", str(folder)]
    command += ["--ref_cache_dir", str(tmp_path / "refs")]
    result = subprocess.run([sys.executable, *command], cwd=common.REPO_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    card = (folder / "README.md").read_text()
    records = metrics(folder)
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- minpo\n- dpo\n")
    assert "`tiny` trained with minpo's `dpo.py`: DPO: Direct Preference Optimization" in card
    assert f"```bash\n{' '.join(['python', *command])}\n```" in card
    final = records[-1]
    assert (
        f"| reward accuracy | {records[0]['eval/reward_accuracy']:.4f} | {final['eval/reward_accuracy']:.4f} |" in card
    )
    assert f"| held-out | step 0 | step {final['step']} |" in card
    assert "64 training pairs read from `tiny`, 16 with chosen and rejected swapped by `--flip_frac`" in card
    assert "| `--beta` | `0.01` |" in card and "| `--flip_frac` | `0.25` |" in card
    assert f"python eval.py {folder}" in card
    assert card == common.model_card(folder)  # made from args.json and metrics.jsonl alone


def test_readme_shows_the_card_of_the_quick_start_run():
    """docs/model_card/ holds args.json and metrics.jsonl of `python dpo.py --model tiny --data tiny`: its card, as
    model_card makes it, is the one in docs/model_card/README.md and in the README."""
    folder = common.REPO_DIR / "docs" / "model_card"
    card = common.model_card(folder)
    assert card == (folder / "README.md").read_text()
    assert "```bash\npython dpo.py --model tiny --data tiny\n```" in card
    assert card.split("---\n", 2)[2] in (common.REPO_DIR / "README.md").read_text()
