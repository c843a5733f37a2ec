"""robustness.py: a small grid end to end (table and plot from the cells' own metrics), finished cells never rerun,
an interrupted cell resumed, and clear errors for a bad grid."""

import json
import statistics

import matplotlib.image
import pytest

import robustness
from common import InputError

SMALL = ["--max_train_samples", "64", "--global_batch_size", "16", "--micro_batch_size", "8", "--num_epochs", "1"]


def small_study(tmp_path, **overrides):
    fields = dict(methods=("dpo", "simpo"), flip_fracs=(0.0, 0.5), seeds=(1,), output_dir=str(tmp_path / "study"))
    return robustness.StudyArgs(**(fields | overrides))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The 2 methods x 2 p x 1 seed grid, trained once for the tests below (about 30 s)."""
    tmp_path = tmp_path_factory.mktemp("robustness")
    args, flags = small_study(tmp_path), SMALL + ["--ref_cache_dir", str(tmp_path / "refs")]
    return args, flags, robustness.study(args, flags)


def test_every_cell_trained_and_recorded(finished):
    args, _, results = finished
    folder = robustness.Path(args.output_dir)
    lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert lines == results and len(lines) == 4
    assert {(r["method"], r["flip_frac"]) for r in lines} == {(m, p) for m in args.methods for p in args.flip_fracs}
    for r in lines:
        cell = folder / robustness.cell_name(r["method"], r["flip_frac"], r["seed"])
        metrics = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
        assert r["accuracy"] == metrics[-1]["eval/reward_accuracy"]  # the cell's own final held-out accuracy
        assert r["flipped"] == round(r["flip_frac"] * 64)
        kept = ["args.json", "metrics.jsonl", "replies.jsonl", "train.log"]  # no weights
        assert sorted(p.name for p in cell.iterdir()) == kept


def test_table_is_written_from_the_results(finished):
    args, _, results = finished
    table = (robustness.Path(args.output_dir) / "table.md").read_text()
    for metric, title in robustness.METRICS.items():
        section = table.split(f"**{title}**")[1].split("**")[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        assert "| method | p = 0 | p = 0.5 |" in section
        assert [row.split("|")[1].strip() for row in rows] == ["`dpo.py`", "`simpo.py`"]
        for row, method in zip(rows, args.methods):
            cells = [c.strip() for c in row.split("|")[2:-1]]
            expected = [
                next(r[metric] for r in results if (r["method"], r["flip_frac"]) == (method, p)) for p in (0, 0.5)
            ]
            assert cells == [f"{a:.3f}" for a in expected]  # one seed: no interval


def test_plot_has_one_panel_per_metric_and_a_line_per_method(finished, tmp_path):
    args, _, results = finished
    assert matplotlib.image.imread(robustness.Path(args.output_dir) / "plot.png").shape[2] in (3, 4)
    figure = robustness.plot(tmp_path / "again.png", results, args)
    panels = [axes for axes in figure.axes if axes.containers]
    assert [axes.get_title() for axes in panels] == list(robustness.METRICS.values())
    for axes, metric in zip(panels, robustness.METRICS):
        drawn = axes.containers  # one errorbar (points + interval bars) per method
        assert [container.get_label() for container in drawn] == ["dpo", "simpo"]
        for (line, _, _), method in zip(drawn, args.methods):
            assert all(abs(x - p) < 0.1 for x, p in zip(line.get_xdata(), [0.0, 0.5]))  # side by side around each p
            assert list(line.get_ydata()) == [r[metric] for r in results if r["method"] == method]


def test_interval_is_the_t_interval_worked_by_hand():
    # mean 0.8, sample std sqrt(0.02 / 3), n = 4: half-width t_{0.975}(3) = 3.182 times std / 2
    mean, half = robustness.interval([0.7, 0.8, 0.9, 0.8])
    assert mean == pytest.approx(0.8)
    assert half == pytest.approx(3.182 * (0.02 / 3) ** 0.5 / 2)
    assert robustness.interval([0.5]) == (0.5, None)
    assert robustness.interval([0.9, 0.9]) == (0.9, 0.0)
    assert robustness.interval([0.0, 1.0] * 20)[1] == pytest.approx(1.96 * statistics.stdev([0.0, 1.0] * 20) / 40**0.5)


def test_methods_are_told_apart_only_when_every_interval_is_narrower_than_the_gap(tmp_path):
    args = small_study(tmp_path, methods=("dpo", "simpo"), flip_fracs=(0.1, 0.3), seeds=(1, 2, 3))
    values = {  # (method, p) -> over seeds 1, 2, 3
        ("dpo", 0.1): [0.90, 0.91, 0.89],
        ("simpo", 0.1): [0.70, 0.71, 0.69],
        ("dpo", 0.3): [0.9, 0.5, 0.7],
        ("simpo", 0.3): [0.5, 0.9, 0.6],
    }
    results = [
        {"method": m, "flip_frac": p, "seed": seed, "reply_score": v}
        for (m, p), seeds in values.items()
        for seed, v in enumerate(seeds, start=1)
    ]
    lines = robustness.metric_table(results, args, "reply_score")
    half = 4.303 * 0.01 / 3**0.5  # t_{0.975}(2) · std / sqrt(3)
    assert f"| `dpo.py` | 0.900 ± {half:.3f} |" in lines[4]
    verdict = lines[-2]
    assert f"p = 0.1: yes (gap 0.200, widest interval {2 * half:.3f})" in verdict
    assert "p = 0.3: no (gap 0.033, widest" in verdict


def test_finished_cells_are_not_rerun_and_a_missing_one_is(finished, monkeypatch):
    args, flags, results = finished
    calls = []
    monkeypatch.setattr(robustness, "run_cell", lambda args, flags, *cell: calls.append(cell) or results[-1])
    assert robustness.study(args, flags) == results
    assert calls == []
    results_file = robustness.Path(args.output_dir) / "results.jsonl"
    lines = results_file.read_text().splitlines()
    results_file.write_text("".join(line + "\n" for line in lines[:-1]))  # as if the last cell was interrupted
    robustness.study(args, flags)
    last = results[-1]
    assert calls == [(last["method"], last["flip_frac"], last["seed"])]


def test_interrupted_cell_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A cell whose run started (it wrote args.json) is continued with --resume, whatever a kill left."""
    args = small_study(tmp_path)
    cell = tmp_path / "study" / robustness.cell_name("dpo", 0.5, 1)
    (cell / "checkpoint").mkdir(parents=True)
    (cell / "args.json").write_text("{}")
    commands = []

    def fake_run(command, stdout, stderr):
        commands.append(command)
        (cell / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval/reward_accuracy": 0.75}) + "\n")
        (cell / "args.json").write_text(json.dumps({"train_rows": {"loaded": 64, "flipped": 32}}))
        return robustness.subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(robustness.subprocess, "run", fake_run)
    result = robustness.run_cell(args, ["--beta", "0.1"], "dpo", 0.5, 1)
    assert commands[0][-3:] == ["--resume", "--beta", "0.1"]
    assert "--flip_frac" in commands[0] and commands[0][commands[0].index("--flip_frac") + 1] == "0.5"
    assert (result["accuracy"], result["start_accuracy"], result["flipped"]) == (0.75, None, 32)


def test_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path, capsys):
    """--label_smoothing exists in dpo.py only: the simpo cell fails, the dpo cell still trains, and the command
    reports the failure and exits 1."""
    args = small_study(tmp_path, methods=("simpo", "dpo"), flip_fracs=(0.0,))
    flags = [*SMALL, "--label_smoothing", "0.1", "--ref_cache_dir", str(tmp_path / "refs")]
    with pytest.raises(robustness.CellFailed, match=r"1 of 2 runs failed .*failures.jsonl.*simpo/p0_seed1 failed"):
        robustness.study(args, flags)
    folder = tmp_path / "study"
    (done,) = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    (failed,) = [json.loads(line) for line in (folder / "failures.jsonl").read_text().splitlines()]
    assert done["method"] == "dpo" and failed["method"] == "simpo"
    assert "its log" in failed["error"] and "simpo.py --help" in failed["error"]  # the end of its log
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        robustness.main(
            ["--methods", "simpo", "--flip_fracs", "0", "--seeds", "1", "--output_dir", str(folder), "--", *flags]
        )
    assert exit.value.code == 1
    assert "\nrobustness: 1 of 1 runs failed (listed in" in capsys.readouterr().err


def test_cell_killed_with_only_checkpoint_old_resumes(tmp_path, monkeypatch):
    """A kill between the checkpoint swap's two renames can leave a cell with checkpoint.old and checkpoint.tmp: the
    study resumes the cell like any other interrupted one."""
    import os

    import common
    import dpo

    args = small_study(tmp_path, methods=("dpo",), flip_fracs=(0.0,))
    cell = tmp_path / "study" / robustness.cell_name("dpo", 0.0, 1)
    flags = [*SMALL, "--ref_cache_dir", str(tmp_path / "refs"), "--save_steps", "1"]
    real_replace, renames = os.replace, []

    def killed_mid_swap(src, dst):
        renames.append(src)
        if str(src).endswith("checkpoint.tmp") and renames.count(src) == 2:
            raise KeyboardInterrupt  # the second swap dies after checkpoint -> checkpoint.old
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_mid_swap)
    argv = ["--model", "tiny", "--flip_frac", "0.0", "--seed", "1", "--output_dir", str(cell), *flags]
    with pytest.raises(KeyboardInterrupt):
        common.train(common.parse_args(dpo.Args, argv), dpo.loss_fn, True, "dpo")
    monkeypatch.undo()
    assert sorted(p.name for p in cell.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint.old",
        "checkpoint.tmp",
    ]
    (result,) = robustness.study(args, flags)
    assert (
        result["accuracy"] == json.loads((cell / "metrics.jsonl").read_text().splitlines()[-1])["eval/reward_accuracy"]
    )
    assert "resumed from" in (cell / "train.log").read_text()


@pytest.mark.parametrize(
    "overrides, flags, message",
    [
        (dict(methods=("dpo", "kto")), [], "unknown method kto; pick from dpo, ipo"),
        (dict(flip_fracs=(0.0, 1.0)), [], r"--flip_fracs 1.0 is outside \[0, 1\)"),
        (dict(seeds=()), [], "need at least one value"),
        ({}, ["--seed", "3"], "--seed after -- is set by the study"),
        ({}, ["--flip_frac=0.2"], "--flip_frac after -- is set by the study"),
    ],
)
def test_bad_grid(tmp_path, overrides, flags, message):
    with pytest.raises(InputError, match=message):
        robustness.study(small_study(tmp_path, **overrides), flags)


def test_other_settings_in_the_same_folder(tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text(json.dumps({"model": "tiny", "data": "other", "train_flags": []}))
    with pytest.raises(InputError, match="holds a study with other settings"):
        robustness.study(small_study(tmp_path), [])


def test_cli_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        robustness.main(["--methods", "nope"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().startswith("robustness: error: unknown method nope;")


def test_readme_table_is_the_one_the_script_wrote(tmp_path):
    """docs/robustness/ holds what `python robustness.py` wrote on the tiny task; the README shows its tables,
    which write_table rebuilds from results.jsonl, and in them DPO's log-ratio accuracy falls at every step of p."""
    folder = robustness.REPO_DIR / "docs" / "robustness"
    args = robustness.StudyArgs()
    assert json.loads((folder / "study.json").read_text()) == {"model": "tiny", "data": "tiny", "train_flags": []}
    results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    grid = {(m, p, s) for m in args.methods for p in args.flip_fracs for s in args.seeds}
    assert len(results) == len(grid) and {(r["method"], r["flip_frac"], r["seed"]) for r in results} == grid
    table = (folder / "table.md").read_text()
    assert robustness.write_table(tmp_path / "table.md", results, args, []) == table
    assert table in (robustness.REPO_DIR / "README.md").read_text()
    dpo = robustness.summarize(results, "log_ratio_accuracy")
    means = [sum(dpo["dpo", p]) / len(dpo["dpo", p]) for p in args.flip_fracs]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert matplotlib.image.imread(folder / "plot.png").shape[:2] == (792, 1518)  # 2 x 3 panels


def test_readme_selection_table_is_the_one_the_script_wrote(tmp_path):
    folder = robustness.REPO_DIR / "docs" / "select_frac" / "same_steps"
    settings = json.loads((folder / "study.json").read_text())
    assert settings["train_flags"] == ["--select_frac", "0.5", "--num_epochs", "4"]
    args = robustness.StudyArgs(methods=("dpo", "simpo", "gammapo"))
    results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    table = robustness.write_table(tmp_path / "table.md", results, args, settings["train_flags"])
    assert table == (folder / "table.md").read_text()
    assert table in (robustness.REPO_DIR / "README.md").read_text()
