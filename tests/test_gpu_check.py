"""bench/gpu_check.py, the one command a GPU machine runs: its --dry_run (every step at tiny sizes, what a CPU can run)
prints and writes a row for every check and exits 0; a step that fails or raises is a row and the steps after it
still run; a command past its time limit is ended together with what it started."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

ROWS = [
    "environment",
    "CUDA tests (pytest tests/test_cuda.py)",
    "model and pairs",
    "train dpo.py, checkpointing on",
    "train dpo.py, checkpointing off",
    "train gammapo.py, checkpointing on",
    "train gammapo.py, checkpointing off",
    "AdamW fused vs foreach",
    "eval.py --limit",
    "bench/vs_trl.py",
]


def table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| check |")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_dry_run_has_every_row_and_exits_0(tmp_path):
    output = tmp_path / "out" / "gpu_check.md"
    command = [sys.executable, "bench/gpu_check.py", "--dry_run", "--output", str(output)]
    done = subprocess.run(command + ["--work_dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = output.read_text()
    assert table in done.stdout  # the table printed is the table written
    rows = table_rows(table)
    assert [row[0] for row in rows] == ROWS
    assert all(len(row) == 4 and float(row[3]) >= 0 for row in rows)
    results = {row[0]: row[1] for row in rows}
    assert not [check for check, result in results.items() if result.startswith("failed")]
    assert results["model and pairs"] == "ok"
    assert all(results[check].startswith("ok") for check in ROWS[3:7])  # the four training runs
    assert results["eval.py --limit"].startswith("ok")
    if not torch.cuda.is_available():
        assert results["CUDA tests (pytest tests/test_cuda.py)"] == "skipped: no CUDA"
        assert results["AdamW fused vs foreach"] == "skipped: no CUDA"
    record = json.loads(output.with_suffix(".json").read_text())
    assert [row["check"] for row in record["rows"]] == ROWS
    assert "=== dpo.py:" in output.with_suffix(".log").read_text()  # each command's output, for a failed row
    assert not (tmp_path / "work").exists()  # removed without --keep


@pytest.fixture
def check(tmp_path):
    args = argparse.Namespace(dry_run=True, work_dir=str(tmp_path / "work"), output=str(tmp_path / "t.md"), budget_s=60)
    return gpu_check.Check(args, cuda=False)


def test_a_failing_step_is_a_row_and_the_next_ones_run(check):
    def raises():
        raise RuntimeError("a bug in the check\nmore detail")

    def fails():
        raise gpu_check.StepFailed("exit 2: dpo: error: --micro_batch_size must be at least 1")

    steps = [("raises", raises, 0), ("fails", fails, 0), ("works", lambda: gpu_check.Outcome("ok", "42 tokens/s"), 0)]
    check.run_steps(steps)
    assert [row[:3] for row in table_rows(check.output.read_text())] == [
        ["raises", "failed: RuntimeError: a bug in the check", ""],
        ["fails", "failed: exit 2: dpo: error: --micro_batch_size must be at least 1", ""],
        ["works", "ok", "42 tokens/s"],
    ]
    assert check.failed()
    check.deadline = time.monotonic()  # the budget is spent: later steps are not started
    check.run_steps([("late", lambda: pytest.fail("started past the budget"), 10)])
    assert check.rows[-1]["result"].startswith("not run: --budget_s 60 spent")


def test_a_command_past_its_limit_is_ended_with_what_it_started(check):
    started = time.monotonic()
    with pytest.raises(gpu_check.StepFailed, match="timed out after 1 s"):
        check.call("sleepers", ["sh", "-c", "sleep 60 & sleep 60"], timeout=1)
    # The background sleep holds the output pipes open: only ending the whole process group returns this soon.
    assert time.monotonic() - started < 30
    assert "killed after 1 s" in check.log_path.read_text()


def test_vs_trl_row_reads_its_json():
    """bench/vs_trl.py --json's results (its keys; MFU only on a GPU): ratios per method, a failed run fails the row."""
    run = dict(tokens_per_s=600.0, peak_gb=1.0, step_s=13.3)
    results = {"minpo dpo": run | {"mfu": 0.30}, "trl dpo": run | dict(tokens_per_s=400.0, peak_gb=2.0, mfu=0.20)}
    results |= {"minpo simpo": run, "trl simpo": {"error": "torch.OutOfMemoryError: CUDA out of memory."}}
    outcome = gpu_check.vs_trl_summary(results)
    assert outcome.result == "failed: trl simpo: torch.OutOfMemoryError: CUDA out of memory."
    dpo = "dpo 1.50x tokens/s (600 / 400), 0.50x peak GB (1.0 / 2.0), MFU 30.0% / 20.0%"
    assert outcome.numbers == f"minpo / TRL: {dpo}"  # simpo has no pair of finished runs
