"""Nothing lost: every kill, stop, full or unwritable disk, damaged file and second writer leaves a run that resumes.

Kills inside the checkpoint swap are simulated in-process by raising `Killed` (a BaseException nothing in minpo
catches) at the chosen instant: the folder is left as kill -9 would leave it, and the resumed run must end with the
same weights, bit for bit, as an uninterrupted one. Signals, full disks (a small tmpfs where this machine may mount
one, a file-size limit everywhere) and a second writer are real. bench/kill_loop.py does the same with real kill -9
at random instants."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import common
import dpo
import gammapo

FLAGS = ["--max_train_samples", "64", "--max_test_samples", "16", "--global_batch_size", "16"]
FLAGS += ["--micro_batch_size", "8", "--num_epochs", "1", "--save_steps", "1"]  # 4 steps, a checkpoint after each


class Killed(BaseException):
    """kill -9 at this instant: nothing in minpo catches it."""


def run(tmp_path, name, extra=(), method=dpo):
    argv = ["--model", "tiny", "--output_dir", str(tmp_path / name), "--ref_cache_dir", str(tmp_path / "refs")]
    args = common.parse_args(method.Args, [*argv, *FLAGS, *extra])
    return common.train(
        args, method.loss_fn, method.NEEDS_REFERENCE, method.__name__, getattr(method, "LOSS_STATE", None)
    )


def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must match; its reference cache is shared with them."""
    tmp_path = tmp_path_factory.mktemp("faults")
    run(tmp_path, "straight")
    return tmp_path


def kill_at(monkeypatch, target, name, nth=1, before=None):
    """Make module.attribute raise Killed on its nth call whose first argument's name is `name` (any, if None),
    after running `before` on that argument (e.g. deleting part of a folder)."""
    module, attribute = target
    real, calls = getattr(module, attribute), []

    def wrapper(*args, **kwargs):
        if name is None or os.path.basename(str(args[0])) == name:
            calls.append(args)
            if len(calls) == nth:
                if before:
                    before(*args)
                raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attribute, wrapper)


def delete_some(folder):
    for path in sorted(os.scandir(folder), key=lambda e: e.name)[:2]:
        os.unlink(path.path)


def folder_state(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint"))


@pytest.mark.parametrize(
    "kill, state",
    [
        # the first checkpoint killed while its files are written: only an unsealed checkpoint.tmp
        (((common, "rng_state"), None), ["checkpoint.tmp"]),
        # the second one killed while written: the first one and an unsealed checkpoint.tmp
        (((common, "rng_state"), None, 2), ["checkpoint", "checkpoint.tmp"]),
        # killed between the swap's two renames: checkpoint.old and a sealed checkpoint.tmp
        (((os, "replace"), "checkpoint.tmp", 2), ["checkpoint.old", "checkpoint.tmp"]),
        # killed while deleting checkpoint.old: half of it left beside the new checkpoint
        (((shutil, "rmtree"), "checkpoint.old.deleting", 1, delete_some), ["checkpoint", "checkpoint.old.deleting"]),
    ],
    ids=["only tmp", "final + tmp", "old + tmp", "half-deleted old beside final"],
)
def test_killed_inside_a_checkpoint_resumes_bit_identical(straight, tmp_path, monkeypatch, kill, state):
    kill_at(monkeypatch, *kill)
    with pytest.raises(Killed):
        run(straight, tmp_path.name)
    assert folder_state(straight / tmp_path.name) == state
    monkeypatch.undo()
    run(straight, tmp_path.name, ["--resume"])
    assert_same_weights(straight / tmp_path.name, straight / "straight")
    assert [m["step"] for m in metrics(straight / tmp_path.name)] == [0, 1, 2, 3, 4]
    assert folder_state(straight / tmp_path.name) == []


def test_old_half_deleted_folders_from_earlier_versions_do_not_block(straight, tmp_path, monkeypatch):
    """What the previous swap could leave: a half-deleted checkpoint.old beside a whole checkpoint (its next swap
    failed with 'Directory not empty' forever) and a checkpoint folder holding only trainer.pt (--resume failed,
    a fresh start was refused)."""
    kill_at(monkeypatch, (common, "rng_state"), None, 3)
    with pytest.raises(Killed):
        run(straight, "legacy")
    monkeypatch.undo()
    folder = straight / "legacy"
    shutil.copytree(folder / "checkpoint", folder / "checkpoint.old")
    delete_some(folder / "checkpoint.old")  # manifest.json and __0_0.distcp
    run(straight, "legacy", ["--resume"])
    assert_same_weights(folder, straight / "straight")

    shutil.rmtree(folder)
    (folder / "checkpoint").mkdir(parents=True)
    torch.save({"step": 3}, folder / "checkpoint" / "trainer.pt")
    run(straight, "legacy")  # not a checkpoint: a fresh start goes ahead
    assert_same_weights(folder, straight / "straight")


def test_killed_while_the_finished_run_deletes_its_checkpoint(straight, tmp_path, monkeypatch, capsys):
    """After the model is saved the run is complete: --resume says so, cleans up and changes nothing."""
    kill_at(monkeypatch, (shutil, "rmtree"), "checkpoint.deleting", 1, delete_some)
    with pytest.raises(Killed):
        run(straight, tmp_path.name)
    folder = straight / tmp_path.name
    assert folder_state(folder) == ["checkpoint.deleting"]
    monkeypatch.undo()
    result = run(straight, tmp_path.name, ["--resume"])
    assert result == metrics(folder)[-1] and result["step"] == 4
    assert folder_state(folder) == []
    assert_same_weights(folder, straight / "straight")
    capsys.readouterr()
    run(straight, tmp_path.name)  # the same command without --resume trains it again, and says so
    assert "holds a finished run (4 steps): training it again" in capsys.readouterr().out
    assert_same_weights(folder, straight / "straight")


def test_resume_flag_with_nothing_saved_yet_starts_over(straight, tmp_path, monkeypatch):
    """A job that always passes --resume (a requeued scheduler job) and was killed before its first checkpoint."""
    kill_at(monkeypatch, (common, "train_step"), None)
    with pytest.raises(Killed):
        run(straight, tmp_path.name, ["--save_steps", "0"])
    monkeypatch.undo()
    run(straight, tmp_path.name, ["--save_steps", "0", "--resume"])
    assert_same_weights(straight / tmp_path.name, straight / "straight")


def test_half_written_metrics_line_is_dropped(straight, tmp_path, monkeypatch, capsys):
    kill_at(monkeypatch, (common, "rng_state"), None, 3)
    with pytest.raises(Killed):
        run(straight, tmp_path.name)
    monkeypatch.undo()
    folder = straight / tmp_path.name
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.69')  # a kill in the middle of a line
    run(straight, tmp_path.name, ["--resume"])
    assert "dropped its last line, which a kill left half-written" in capsys.readouterr().out
    assert [m["step"] for m in metrics(folder)] == [0, 1, 2, 3, 4]
    assert_same_weights(folder, straight / "straight")


# ---- damaged checkpoints: the manifest names the file ----


def stopped_after_three_steps(straight, name, monkeypatch):
    kill_at(monkeypatch, (common, "save_model"), None)  # the last checkpoint is step 3's
    with pytest.raises(Killed):
        run(straight, name)
    monkeypatch.undo()
    return straight / name / "checkpoint"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_16_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensor data
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (truncate, "__0_0.distcp", r"__0_0.distcp is damaged \(\d+ bytes, written with \d+\)"),
        (os.unlink, ".metadata", r"checkpoint/.metadata is missing"),
        (os.unlink, "__0_0.distcp", r"checkpoint/__0_0.distcp is missing"),
        (truncate, "trainer.pt", r"checkpoint/trainer.pt is damaged \(\d+ bytes"),
        (flip_16_bytes, "__0_0.distcp", r"__0_0.distcp is damaged \(its SHA-256 is not the one it was written with"),
    ],
    ids=["truncated shard", "missing .metadata", "missing shard", "truncated trainer.pt", "16 flipped bytes"],
)
def test_damaged_checkpoint_is_named_in_one_line(straight, tmp_path, monkeypatch, damage, file, message):
    checkpoint = stopped_after_three_steps(straight, tmp_path.name, monkeypatch)
    damage(checkpoint / file)
    with pytest.raises(common.InputError, match=message + ".*no whole checkpoint is left: put the file back"):
        run(straight, tmp_path.name, ["--resume"])


def test_damaged_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, monkeypatch, capsys):
    kill_at(monkeypatch, (common, "rng_state"), None, 3)
    with pytest.raises(Killed):
        run(straight, tmp_path.name)
    folder = straight / tmp_path.name
    shutil.copytree(folder / "checkpoint", tmp_path / "step2")
    monkeypatch.undo()
    stopped_after_three_steps(straight, tmp_path.name + "_", monkeypatch)  # a second run to step 3
    shutil.rmtree(folder)
    shutil.move(straight / (tmp_path.name + "_"), folder)
    shutil.copytree(tmp_path / "step2", folder / "checkpoint.old")  # what a kill inside the swap can leave
    flip_16_bytes(folder / "checkpoint" / "__0_0.distcp")
    run(straight, tmp_path.name, ["--resume"])
    log = capsys.readouterr().out
    assert "__0_0.distcp is damaged" in log and "resumed from" in log and "checkpoint.old at step 2" in log
    assert_same_weights(folder, straight / "straight")


def test_checkpoint_state_loads_without_unpickling_code(straight, tmp_path, monkeypatch):
    """trainer.pt and rng_rank*.pt hold tensors and plain types only: torch.load(weights_only=True) reads them."""
    kill_at(monkeypatch, (gammapo.GapHistory, "state_dict"), None, 3)  # gammaPO's state is saved too
    with pytest.raises(Killed):
        run(straight, tmp_path.name, method=gammapo)
    checkpoint = straight / tmp_path.name / "checkpoint"
    trainer = torch.load(checkpoint / "trainer.pt", weights_only=True)
    assert trainer["step"] == 2 and set(trainer["loss_state"]) == {"gaps", "generator"}
    assert set(torch.load(checkpoint / "rng_rank0.pt", weights_only=True)) == {"torch", "python", "numpy"}
    assert json.loads((checkpoint / "args.json").read_text())["method"] == "gammapo"


# ---- one writer per folder, a usable folder before any work ----


def test_second_run_in_the_same_folder_stops_at_once(tmp_path, monkeypatch):
    lock, _ = common.claim_output_dir(tmp_path / "busy")  # as a running run holds it
    monkeypatch.setattr(common, "load_data", lambda args: pytest.fail("work started"))
    try:
        with pytest.raises(common.InputError, match=r"busy is in use by another run \(pid \d+ on .*\); wait"):
            run(tmp_path, "busy")
    finally:
        os.close(lock)


def test_output_dir_that_is_a_file_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "load_data", lambda args: pytest.fail("work started"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.InputError, match="--output_dir .*file is a file, not a folder"):
        run(tmp_path, "file")
    with pytest.raises(common.InputError, match="--output_dir .*file/run is not writable"):
        run(tmp_path, "file/run")


# ---- the reference cache only saves time ----


def test_reference_cache_that_cannot_be_written_is_skipped(tmp_path, capsys):
    (tmp_path / "refs").write_text("a file where the cache folder should be")
    result = run(tmp_path, "run", ["--num_epochs", "1"])
    assert "warning: could not cache reference log-probs" in capsys.readouterr().out
    assert result["step"] == 4 and (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "shape"])
def test_damaged_reference_cache_is_computed_again(straight, tmp_path, capsys, damage):
    cache_files = sorted((straight / "refs").glob("*.pt"))
    originals = {f: torch.load(f, weights_only=True) for f in cache_files}
    target = max(cache_files, key=lambda f: f.stat().st_size)  # the training pairs'
    {
        "truncate": truncate,
        "garbage": lambda f: f.write_bytes(b"not a tensor"),
        "shape": lambda f: torch.save(torch.zeros(3, 2), f),
    }[damage](target)
    run(straight, tmp_path.name, ["--save_steps", "0"])
    assert f"warning: reference cache {target} is" in capsys.readouterr().out
    assert torch.equal(torch.load(target, weights_only=True), originals[target])  # replaced by the right values
    assert_same_weights(straight / tmp_path.name, straight / "straight")
    assert not list((straight / "refs").glob("*.tmp*"))


# ---- signals ----


def launch_args(tmp_path, name, extra=()):
    command = ["dpo.py", "--model", "tiny", "--output_dir", str(tmp_path / name)]
    return command + ["--ref_cache_dir", str(tmp_path / "refs"), *FLAGS, "--save_steps", "0", *extra]


def launch(tmp_path, name, extra=()):
    command = [sys.executable, *launch_args(tmp_path, name, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=common.REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(folder, step, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
        if any(json.loads(line)["step"] >= step for line in lines if line.endswith("}")):
            return
        time.sleep(0.05)
    pytest.fail(f"step {step} not reached")


def test_sigterm_checkpoints_the_step_and_resume_is_bit_identical(tmp_path):
    straight = launch(tmp_path, "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    process = launch(tmp_path, "stopped")
    wait_for_step(tmp_path / "stopped", 1, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dpo: stopped:")]
    assert "SIGTERM: stopped after step" in line and "run the same command with --resume" in line
    assert (tmp_path / "stopped" / "checkpoint" / "manifest.json").is_file()  # written although --save_steps 0
    resumed = launch(tmp_path, "stopped", ["--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_weights(tmp_path / "stopped", tmp_path / "straight")


def test_second_signal_stops_at_once(tmp_path):
    long_steps = ["--max_train_samples", "1024", "--global_batch_size", "1024", "--num_epochs", "3"]  # ~10 s each
    process = launch(tmp_path, "run", long_steps)
    wait_for_step(tmp_path / "run", 1, process)
    process.send_signal(signal.SIGINT)
    time.sleep(common.StopSignal.DUPLICATE_S + 0.5)  # sooner, it is taken for the same request delivered twice
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    assert "SIGINT: stopped at once" in err and "Traceback" not in err


# ---- full disks ----


def limit_file_size(limit):
    def preexec():  # writes past the limit fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_write_failure_while_checkpointing_is_one_line(straight, tmp_path):
    """A file-size limit (any user can set one) fails the checkpoint's shard file like a full disk would."""
    command = [sys.executable, "dpo.py", "--model", "tiny", "--output_dir", str(tmp_path / "run")]
    command += ["--ref_cache_dir", str(straight / "refs"), *FLAGS]
    result = subprocess.run(
        command, cwd=common.REPO_DIR, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(2**20)
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("dpo: stopped:")]
    assert "step 1: could not write the checkpoint in" in line and "a write was cut short" in line
    assert "no checkpoint was written; make room, then run the same command with --resume" in line
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MiB tmpfs: the first tiny checkpoint (about 5.6 MB) fits, the second does not. Needs mount rights."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_keeps_the_last_checkpoint_and_says_so(straight, small_disk, tmp_path):
    with pytest.raises(common.RunStopped) as stopped:
        run(straight, small_disk / "run")
    message = str(stopped.value)
    assert message.startswith("step 2: could not write the checkpoint in") and "the disk is full" in message
    assert "the checkpoint of step 1 is kept; make room, then run the same command with --resume" in message
    assert folder_state(small_disk / "run") == ["checkpoint"]
    shutil.copytree(small_disk / "run", tmp_path / "room")  # make room: here, by moving to a bigger disk
    run(straight, tmp_path / "room", ["--resume"])
    assert_same_weights(tmp_path / "room", straight / "straight")


def test_full_disk_for_the_reference_cache_is_skipped(small_disk, tmp_path, capsys):
    (small_disk / "filler").write_bytes(b"\0" * (9 * 2**20 - 4096))
    run(tmp_path, "run", ["--ref_cache_dir", str(small_disk / "refs"), "--save_steps", "0"])
    log = capsys.readouterr().out
    assert "warning: could not cache reference log-probs" in log and "the disk is full" in log
    assert not [p for p in (small_disk / "refs").iterdir() if ".tmp" in p.name]


def test_read_only_output_dir_fails_before_any_work(tmp_path, monkeypatch):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(common, "load_data", lambda args: pytest.fail("work started"))
        with pytest.raises(common.InputError, match="ro/run is not writable .Read-only file system."):
            run(tmp_path, "ro/run")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_sigterm_to_torchrun_and_its_workers_stops_gracefully(tmp_path):
    """SLURM's preemption and a terminal's Ctrl-C signal every process of the job: each worker gets the signal from
    the system and again from torchrun. The workers still finish the step, checkpoint, and resume bit-identical."""
    straight = launch(tmp_path, "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += launch_args(tmp_path, "stopped")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        cwd=common.REPO_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_step(tmp_path / "stopped", 1, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert "dpo: stopped: SIGTERM: stopped after step" in err
    assert (tmp_path / "stopped" / "checkpoint" / "manifest.json").is_file()
    resumed = subprocess.run([*command, "--resume"], cwd=common.REPO_DIR, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, value in load_file(tmp_path / "straight" / "model.safetensors").items():
        torch.testing.assert_close(
            load_file(tmp_path / "stopped" / "model.safetensors")[name], value, rtol=0, atol=1e-5
        )
