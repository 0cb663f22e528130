"""Training survives what stops it: SIGKILL at random instants (a few here, many in
scripts/kill_harness.py), a kill between the final checkpoint and its release, SIGINT, a full disk, and a
killed torchrun worker. Each time the newest checkpoint loads and --resume ends where an uninterrupted
run ends."""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import ENV, ROOT, _wait_for, losses, moving_square_videos, tiny_train_config, train

from genie_env import Genie

spec = importlib.util.spec_from_file_location("kill_harness", ROOT / "scripts" / "kill_harness.py")
kh = importlib.util.module_from_spec(spec)
sys.modules["kill_harness"] = kh
spec.loader.exec_module(kh)

STEPS = {"tokenizer": 5, "lam": 5, "dynamics": 5}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """All three stages, uninterrupted, with a checkpoint after every step."""
    tmp = tmp_path_factory.mktemp("kills")
    data = moving_square_videos(tmp / "data", n=4, frames=10)
    cfg = tiny_train_config(tmp / "c.yaml", **{s: {"max_steps": n} for s, n in STEPS.items()})
    timing = kh.run_uninterrupted(cfg, data, tmp / "reference")
    return tmp, data, cfg, timing


@pytest.fixture
def restore_process_state():
    """An in-process Trainer installs signal handlers and sets torch's thread count: put them back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(1)


def trainer(cfg, data, out, *extra, log=None):
    from training import train as train_mod

    args = train_mod.parse_args(["--config", str(cfg), "--data", str(data), "--out", str(out), "--no-progress",
                                 "--log-every", "1", "--threads", "1", *extra])
    return train_mod.Trainer(args, log=log or (lambda *a: None))


def same_weights(a: dict, b: dict) -> bool:
    return kh.state_equal(a, b)


def release_state(folder: Path) -> dict:
    return Genie.from_pretrained(folder).state_dict()


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_at_random_instants_loses_nothing(reference, tmp_path):
    tmp, data, cfg, timing = reference
    # each kill within a step of a checkpoint write (often inside the next one), so that three kills
    # leave steps to spare before the end of the run
    report = kh.run_with_kills(cfg, data, tmp_path / "killed", kills=3, seed=2, startup_s=timing["startup_s"],
                               step_s=timing["step_s"] / 3, startup_fraction=0.0, log=lambda *a: None)
    assert report.kills == 3
    assert kh.compare_runs(tmp / "reference", tmp_path / "killed") == sum(STEPS.values())


class Killed(BaseException):
    """Stands for a SIGKILL at an exact instant (nothing after it runs, no except clause catches it)."""


def test_kill_after_the_final_checkpoint_before_its_release(reference, tmp_path, monkeypatch,
                                                             restore_process_state):
    """The one instant where a resumed run used to mark a stage finished with a release one step behind,
    so that the next stage trained on stale weights."""
    tmp, data, cfg, _ = reference
    out = tmp_path / "run"
    real = Genie.save_pretrained
    calls = {"n": 0}

    def dies_at_the_last_release(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == STEPS["tokenizer"]:
            raise Killed
        return real(self, *a, **kw)

    monkeypatch.setattr(Genie, "save_pretrained", dies_at_the_last_release)
    with pytest.raises(Killed):
        trainer(cfg, data, out, "--stage", "tokenizer", "--checkpoint-every", "1").run()
    monkeypatch.undo()
    sdir = out / "tokenizer"
    assert checkpoint(sdir / "checkpoint.pt")["step"] == STEPS["tokenizer"] and not (sdir / "DONE").exists()
    assert not same_weights(release_state(sdir / "release"), checkpoint(sdir / "checkpoint.pt")["model"])
    trainer(cfg, data, out, "--stage", "tokenizer", "--resume", "--checkpoint-every", "1").run()
    assert (sdir / "DONE").read_text().strip() == str(STEPS["tokenizer"])
    final = checkpoint(sdir / "checkpoint.pt")["model"]
    assert same_weights(release_state(sdir / "release"), final)
    assert same_weights(final, checkpoint(tmp / "reference" / "tokenizer" / "checkpoint.pt")["model"])
    assert kh.csv_rows(sdir / "metrics.csv") == kh.csv_rows(tmp / "reference" / "tokenizer" / "metrics.csv")


# ---------------------------------------------------------------------------------------------- SIGINT
def test_sigint_saves_a_checkpoint_and_resume_continues(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=2, frames=6)
    cfg = tiny_train_config(tmp_path / "c.yaml", tokenizer={"max_steps": 100000, "epochs": 1000000})
    out = tmp_path / "run"
    csv_path = out / "tokenizer" / "metrics.csv"
    p = subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(cfg), "--data", str(data), "--out",
                          str(out), "--stage", "tokenizer", "--no-progress", "--log-every", "1", "--threads", "1"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: csv_path.is_file() and len(losses(csv_path)) > 3)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, stderr
    assert "SIGINT received" in stdout and "resume with --resume" in stdout
    step = checkpoint(out / "tokenizer" / "checkpoint.pt")["step"]
    assert step >= 3 and sorted(losses(csv_path)) == list(range(1, step + 1))
    r = train(cfg, data, out, "--stage", "tokenizer", "--resume", "--stop-after", "2")
    assert f"at step {step}" in r.stdout
    assert checkpoint(out / "tokenizer" / "checkpoint.pt")["step"] == step + 2
    assert [int(row["step"]) for row in kh.csv_rows(csv_path)] == list(range(1, step + 3))


# ---------------------------------------------------------------------------------------------- disk full
def disk_full(*a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["torch.save", "os.replace", "release"])
def test_full_disk_keeps_the_previous_checkpoint_and_says_so(where, reference, tmp_path, monkeypatch,
                                                             restore_process_state):
    """Every write after the first fails: the run warns at each, keeps the step-2 checkpoint (and release)
    loadable, refuses to call the stage finished, and resumes to the uninterrupted result once there is room."""
    import safetensors.torch

    tmp, data, cfg, _ = reference
    out = tmp_path / "run"
    sdir = out / "tokenizer"
    real_save, real_replace, real_save_file = torch.save, os.replace, safetensors.torch.save_file
    n = {"torch.save": 0, "os.replace": 0, "release": 0}

    def full_after_one(kind, real):
        def write(*a, **kw):
            if kind == "os.replace" and Path(a[1]).name != "checkpoint.pt":
                return real(*a, **kw)
            n[kind] += 1
            if n[kind] > 1:
                if kind == "torch.save":
                    a[1].write(b"half a checkpoint")
                disk_full()
            return real(*a, **kw)
        return write

    target = {"torch.save": (torch, "save", real_save), "os.replace": (os, "replace", real_replace),
              "release": (safetensors.torch, "save_file", real_save_file)}[where]
    monkeypatch.setattr(target[0], target[1], full_after_one(where, target[2]))
    logs: list[str] = []
    with pytest.raises(RuntimeError, match="final checkpoint and release could not be written"):
        trainer(cfg, data, out, "--stage", "tokenizer", "--checkpoint-every", "2", log=logs.append).run()
    monkeypatch.undo()
    warnings = [m for m in logs if m.startswith("warning:")]
    assert len(warnings) == 3  # steps 4, 5 (the last) and the retry after the loop
    if where == "release":
        assert all("writing the release folder failed ([Errno 28] No space left on device); the checkpoint" in m
                   and m.endswith("is intact") for m in warnings)
        assert checkpoint(sdir / "checkpoint.pt")["step"] == STEPS["tokenizer"]
    else:
        assert all(f"writing {sdir / 'checkpoint.pt'} failed ([Errno 28] No space left on device); "
                   "the previous checkpoint, if any, is intact" in m for m in warnings)
        assert checkpoint(sdir / "checkpoint.pt")["step"] == 2
    assert Genie.from_pretrained(sdir / "release")  # still the step-2 release
    assert not (sdir / "DONE").exists()
    assert not list(sdir.glob("checkpoint.pt.tmp*")) and not list(sdir.glob(".release.tmp-*"))
    trainer(cfg, data, out, "--stage", "tokenizer", "--resume", "--checkpoint-every", "2").run()
    ref = tmp / "reference" / "tokenizer"
    assert (sdir / "DONE").is_file()
    assert same_weights(release_state(sdir / "release"), checkpoint(ref / "checkpoint.pt")["model"])
    assert kh.csv_rows(sdir / "metrics.csv") == kh.csv_rows(ref / "metrics.csv")


# ---------------------------------------------------------------------------------------------- torchrun
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(out: Path, local_rank: int) -> list[int]:
    """Processes running training.train into ``out`` with LOCAL_RANK=local_rank (torchrun's workers; the
    launcher itself has no LOCAL_RANK)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"training.train" in cmd and str(out).encode() in cmd and f"LOCAL_RANK={local_rank}".encode() in env:
            found.append(int(proc.name))
    return found


def test_killed_torchrun_worker_stops_the_others_and_the_run_resumes(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=4, frames=8)
    cfg = tiny_train_config(tmp_path / "c.yaml", tokenizer={"max_steps": 100000, "epochs": 1000000})
    out = tmp_path / "run"
    csv_path = out / "tokenizer" / "metrics.csv"
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe nobody reads while waiting
        p = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "training.train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--stage",
             "tokenizer", "--no-progress", "--log-every", "1", "--threads", "1", "--checkpoint-every", "1"],
            cwd=ROOT, env=ENV, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: csv_path.is_file() and len(losses(csv_path)) > 3 or p.poll() is not None)
        assert p.poll() is None, log_path.read_text()
        (victim,) = worker_pids(out, 1)
        (survivor,) = worker_pids(out, 0)
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        p.wait(timeout=120)
        stopped_in = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log = log_path.read_text()
    assert p.returncode != 0, log
    assert stopped_in < 90 and not Path(f"/proc/{survivor}").exists()
    step = checkpoint(out / "tokenizer" / "checkpoint.pt")["step"]
    assert step >= 3
    assert Genie.from_pretrained(out / "tokenizer" / "release")
    # one process picks the run up where the two left it
    r = train(cfg, data, out, "--stage", "tokenizer", "--resume", "--stop-after", "2", "--checkpoint-every", "1")
    assert f"resuming from {out / 'tokenizer' / 'checkpoint.pt'} at step {step}" in r.stdout
    assert checkpoint(out / "tokenizer" / "checkpoint.pt")["step"] == step + 2
    assert [int(row["step"]) for row in kh.csv_rows(csv_path)] == list(range(1, step + 3))
