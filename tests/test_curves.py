"""curves.py on small synthetic runs (no training): every panel has one line per run whose data are the run's own
metrics (smoothed by the moving average worked out by hand below), runs without a metric are left out of its
panel only, the PNG has the size the README expects, and a bad folder stops the command with one line, exit 2."""

import json

import matplotlib.colors
import matplotlib.image
import PIL.Image
import pytest

import curves

STEPS = 12
EVAL_STEPS = 4


def write_run(folder, method="dpo", held_out=True, steps=STEPS, shift=0.0):
    """A run's metrics.jsonl: the loss alternates 1, 3, 1, 3, ... so a 2-step average is 1 then 2 throughout; shift
    moves the log-probs, so that runs drawn together do not hide one another everywhere."""
    folder.mkdir(parents=True)
    records = [{"step": 0, "eval/reward_accuracy": 0.5, "eval/loss": 0.69, "eval/margin": 0.0}] if held_out else []
    for step in range(1, steps + 1):
        record = {"step": step, "epoch": step / steps, "loss": 1.0 if step % 2 else 3.0, "rewards/margin": step * 0.1}
        record |= {
            "rewards/accuracy": 0.5,
            "logps/chosen": shift - step,
            "logps/rejected": shift - 2.0 * step,
            "grad_norm": 1.0,
        }
        record |= {"rewards/chosen": 0.1, "rewards/rejected": 0.0, "lr": 1e-3 * step / steps, "tokens/s": 1.0}
        if held_out and step % EVAL_STEPS == 0:
            record |= {"eval/reward_accuracy": 0.5 + step / 100, "eval/loss": 0.6, "eval/margin": step / 10}
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "args.json").write_text(json.dumps({"method": method, "beta": 0.1}))
    return records


def panels(figure):
    return dict(zip((key for key, _, _ in curves.PANELS), figure.axes))


def test_moving_average_by_hand():
    """Window 3 over 3, 0, 6, 3: 3/1, 3/2, 9/3, 9/3; window 1 leaves the values as they are."""
    assert curves.moving_average([3, 0, 6, 3], 3) == [3, 1.5, 3, 3]
    assert curves.moving_average([3, 0, 6, 3], 1) == [3, 0, 6, 3]


def test_one_line_per_run_with_its_metrics(tmp_path):
    folders = [tmp_path / "dpo", tmp_path / "simpo", tmp_path / "run3"]
    records = [write_run(folders[0]), write_run(folders[1], "simpo"), write_run(folders[2], "gammapo", held_out=False)]
    args = curves.CurvesArgs(folders=tuple(map(str, folders)), output=str(tmp_path / "c.png"), smooth=2)
    figure = curves.curves(args)
    legend = figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["dpo", "simpo", "run3 (gammapo)"]
    colors = [matplotlib.colors.to_hex(handle.get_color()) for handle in legend.legend_handles]
    for key, ax in panels(figure).items():
        runs = [0, 1] if key.startswith("eval/") else [0, 1, 2]  # the third run has no held-out metrics
        lines = ax.get_lines()
        assert [matplotlib.colors.to_hex(line.get_color()) for line in lines] == [colors[k] for k in runs], key
        for line, k in zip(lines, runs):
            logged = [r for r in records[k] if key in r]
            assert list(line.get_xdata()) == [r["step"] for r in logged], key
            if key == "loss":
                assert list(line.get_ydata()) == [1.0] + [2.0] * (STEPS - 1)  # 1, 3, 1, 3, ... over 2 steps
            elif key in ("lr", "rewards/accuracy", "grad_norm") or key.startswith("eval/"):
                assert list(line.get_ydata()) == [r[key] for r in logged], key  # as logged or constant
            assert key.startswith("eval/") == (line.get_marker() == "o"), key
    assert [r["step"] for r in records[0] if "eval/margin" in r] == [0, 4, 8, 12]


def test_smooth_1_draws_the_metrics_as_logged(tmp_path):
    records = write_run(tmp_path / "dpo")
    figure = curves.curves(
        curves.CurvesArgs(folders=(str(tmp_path / "dpo"),), output=str(tmp_path / "c.png"), smooth=1)
    )
    for key, ax in panels(figure).items():
        assert list(ax.get_lines()[0].get_ydata()) == [r[key] for r in records if key in r], key


def test_cli_writes_a_readme_sized_png(tmp_path, capsys):
    for shift, name in enumerate(("dpo", "ipo")):
        write_run(tmp_path / name, name, shift=5 * shift)
    output = tmp_path / "out" / "curves.png"
    curves.main([str(tmp_path / "dpo"), str(tmp_path / "ipo"), "--output", str(output), "--smooth", "3"])
    assert capsys.readouterr().out.strip() == f"curves: {output}"
    assert matplotlib.image.imread(output).shape[:2] == (800, 1200)  # 12 x 8 inches at 100 dpi
    assert PIL.Image.open(output).mode == "P"  # 256 colours: runs that can be told apart keep theirs


def test_same_folder_names_are_told_apart_by_their_paths(tmp_path):
    write_run(tmp_path / "a" / "dpo")
    write_run(tmp_path / "b" / "dpo")
    runs = curves.load_runs([tmp_path / "a" / "dpo", tmp_path / "b" / "dpo"])
    assert [run.label for run in runs] == [str(tmp_path / "a" / "dpo"), str(tmp_path / "b" / "dpo")]


def test_half_written_last_line_is_left_out(tmp_path):
    """A run killed while writing a line (or still running): its complete lines are drawn, as common.py reads them."""
    write_run(tmp_path / "dpo")
    with (tmp_path / "dpo" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "lo')
    (run,) = curves.load_runs([tmp_path / "dpo"])
    assert run.records[-1]["step"] != 99


def bad_metrics(folder, text):
    write_run(folder)
    (folder / "metrics.jsonl").write_text(text)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda folder: None, "has no metrics.jsonl"),
        (lambda folder: folder.mkdir(), "has no metrics.jsonl"),
        (lambda folder: bad_metrics(folder, '{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3}\n'), "line 2 of"),
        (lambda folder: bad_metrics(folder, '{"step": 0, "eval/reward_accuracy": 0.5}\n'), "no training steps"),
        (lambda folder: bad_metrics(folder, ""), "no training steps"),
        (lambda folder: bad_metrics(folder, '[1, 2]\n{"step": 1}\n'), "not a metrics record"),
    ],
)
def test_bad_folder_is_one_line_exit_2(tmp_path, capsys, make_bad, message):
    write_run(tmp_path / "good")
    make_bad(tmp_path / "bad")
    with pytest.raises(SystemExit) as stopped:
        curves.main([str(tmp_path / "good"), str(tmp_path / "bad"), "--output", str(tmp_path / "c.png")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("curves: error: ")
    assert str(tmp_path / "bad") in error and message in error
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    "flags, message", [(["--smooth", "0"], "--smooth must be at least 1"), (["--output", "c.pdf"], "must end in .png")]
)
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, flags, message):
    write_run(tmp_path / "dpo")
    with pytest.raises(SystemExit) as stopped:
        curves.main([str(tmp_path / "dpo"), *flags])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_png_keeps_every_runs_colour(tmp_path):
    """12 runs with the same metrics hide most lines under the last ones, and a 256-colour palette drops some of their
    colours: the PNG must still show each run's colour exactly (in its legend sample at least)."""
    folders = [tmp_path / f"run{k:02d}" for k in range(12)]
    for folder in folders:
        write_run(folder, steps=100)
    curves.main([*map(str, folders), "--output", str(tmp_path / "c.png")])
    pixels = PIL.Image.open(tmp_path / "c.png").convert("RGB")
    shown = {matplotlib.colors.to_hex([c / 255 for c in colour]) for _, colour in pixels.getcolors(maxcolors=2**24)}
    assert {matplotlib.colors.to_hex(f"C{k}") for k in range(10)} <= shown
