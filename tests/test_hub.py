"""Checkpoints: exact save/load, hub download through a local stand-in hub, and untrusted checkpoints
refused with errors that say what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, write_tiny_checkpoint
from hub_server import HubServer
from safetensors.torch import load_file, save_file

from genie_env import CheckpointError, Genie

TESTS = Path(__file__).parent


def test_save_load_exact(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Genie.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.rand(1, 3, 2, 16, 16)
    assert torch.equal(model.tokenize(x), loaded.tokenize(x))


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_overwriting_a_checkpoint_replaces_it_whole(tmp_path, monkeypatch, atomic_swap):
    import genie_env.hub as hub

    if not atomic_swap:  # systems without renameat2(RENAME_EXCHANGE): the two-rename fallback
        monkeypatch.setattr(hub, "_exchange", lambda a, b: False)
    tiny_model(seed=1).save_pretrained(tmp_path / "ckpt")
    second = tiny_model(seed=2)
    second.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left
    loaded = Genie.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.dynamics.head.weight, second.dynamics.head.weight)


def test_save_restores_a_checkpoint_left_aside_by_a_killed_writer(tmp_path, monkeypatch):
    # a writer killed between the fallback's two renames leaves the previous folder as .ckpt.tmp-old;
    # the next save puts it back first, so that even a save that then fails leaves a loadable folder
    first = tiny_model(seed=1)
    first.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.tmp-old")
    (tmp_path / ".ckpt.tmp-abc").mkdir()  # and a half-written one

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        tiny_model(seed=2).save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = Genie.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.dynamics.head.weight, first.dynamics.head.weight)


def test_half_precision_release_keeps_codebooks_exact(tmp_path):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    raw = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert raw["dynamics.head.weight"].dtype == torch.float16
    assert raw["tokenizer.quantizer.embed"].dtype == torch.float32
    loaded = Genie.from_pretrained(tmp_path / "half")
    assert loaded.dynamics.head.weight.dtype == torch.float32  # upcast on load
    assert torch.equal(loaded.tokenizer.quantizer.embed, model.tokenizer.quantizer.embed)


def test_extra_files_travel_with_the_checkpoint(tmp_path, tiny_checkpoint):
    model = Genie.from_pretrained(tiny_checkpoint)
    assert set(model.extra_files) == {"prompts.npz", "action_map.json"}
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "prompts.npz").read_bytes() == (tiny_checkpoint / "prompts.npz").read_bytes()


def _run_with_hub(code: str, server_url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": server_url, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(TESTS.parent)}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_from_pretrained_downloads_repo_id_from_hub(tmp_path, tiny_checkpoint):
    with HubServer({"genie-org/tiny-genie": tiny_checkpoint}) as hub:
        code = f"""
            import torch
            from genie_env import Genie
            m = Genie.from_pretrained("genie-org/tiny-genie")
            ref = Genie.from_pretrained({str(tiny_checkpoint)!r})
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
            assert sorted(m.extra_files) == ["action_map.json", "prompts.npz"], m.extra_files
            try:
                Genie.from_pretrained("genie-org/missing")
            except Exception as e:
                print("MISSING:", e)
            print("OK")
        """
        r = _run_with_hub(code, hub.url, tmp_path)
        assert r.returncode == 0, r.stderr
        assert "OK" in r.stdout
        assert "MISSING: hub repo 'genie-org/missing' not found" in r.stdout
        assert any("/genie-org/tiny-genie/resolve/main/model.safetensors" in q for q in hub.requests)


def test_no_network_says_how_to_load_locally(tmp_path):
    code = """
        from genie_env import Genie
        try:
            Genie.from_pretrained("genie-org/tiny-genie")
        except Exception as e:
            print(type(e).__name__, e)
    """
    env_url = "http://127.0.0.1:9"  # nothing listens there
    env = {**os.environ, "HF_ENDPOINT": env_url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(TESTS.parent)}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert "CheckpointError" in r.stdout, r.stdout + r.stderr
    assert "local checkpoint folder" in r.stdout


# ---------------------------------------------------------------------------------------------- bad checkpoints
def test_missing_folder_and_default_weights(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        Genie.from_pretrained(tmp_path / "nope")
    monkeypatch.setenv("GENIE_ENV_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="no shipped default model"):
        Genie.from_pretrained()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        Genie.from_pretrained(tmp_path / "half")


def test_truncated_and_garbage_weights(tmp_path, tiny_checkpoint):
    w = tiny_checkpoint / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Genie.from_pretrained(tiny_checkpoint)
    w.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file|corrupted"):
        Genie.from_pretrained(tiny_checkpoint)
    w.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors"):
        Genie.from_pretrained(tiny_checkpoint)


def test_config_not_json_and_unknown_fields(tiny_checkpoint):
    cfg = tiny_checkpoint / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        Genie.from_pretrained(tiny_checkpoint)
    cfg.write_text(json.dumps({**good, "secret_field": 1}))
    with pytest.raises(CheckpointError, match="unknown config field.*secret_field"):
        Genie.from_pretrained(tiny_checkpoint)
    cfg.write_text(json.dumps({**good, "dynamics_depth": -1}))
    with pytest.raises(CheckpointError, match="dynamics_depth must be in"):
        Genie.from_pretrained(tiny_checkpoint)


def test_config_that_does_not_match_weights_names_tensors(tiny_checkpoint):
    cfg = tiny_checkpoint / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**good, "dynamics_dim": 64}))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors: .*dynamics\..*config expects \[.*64"):
        Genie.from_pretrained(tiny_checkpoint)
    cfg.write_text(json.dumps({**good, "dynamics_depth": 3}))
    with pytest.raises(CheckpointError, match=r"missing tensors: dynamics\.blocks\.2\."):
        Genie.from_pretrained(tiny_checkpoint)
    cfg.write_text(json.dumps(good))
    w = tiny_checkpoint / "model.safetensors"
    state = load_file(str(w))
    state["evil.extra"] = torch.zeros(3)
    save_file(state, str(w))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: evil\.extra"):
        Genie.from_pretrained(tiny_checkpoint)


def test_nan_weights_refused(tiny_checkpoint):
    w = tiny_checkpoint / "model.safetensors"
    state = load_file(str(w))
    state["dynamics.head.bias"][0] = float("nan")
    save_file(state, str(w))
    with pytest.raises(CheckpointError, match=r"dynamics\.head\.bias holds NaN"):
        Genie.from_pretrained(tiny_checkpoint)


def test_absurd_config_refused_before_allocation(tiny_checkpoint):
    """A config asking for an 8192-wide, 128-deep dynamics (tens of GB) is refused from the header alone:
    peak memory of the process stays small."""
    cfg = tiny_checkpoint / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**good, "dynamics_dim": 8192, "dynamics_depth": 128, "dynamics_num_heads": 64}))
    code = f"""
        import resource
        from genie_env import Genie, CheckpointError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            Genie.from_pretrained({str(tiny_checkpoint)!r})
        except CheckpointError as e:
            print("REFUSED", str(e)[:200])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("GROWTH_MB", (after - before) / 1024)
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    assert "REFUSED" in r.stdout, r.stdout + r.stderr
    assert "config.json does not match the weights" in r.stdout
    growth = float(r.stdout.split("GROWTH_MB")[1])
    assert growth < 200, growth  # the model it describes would need > 100 GB


def test_loading_never_unpickles(tiny_checkpoint, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    Genie.from_pretrained(tiny_checkpoint)


def test_push_to_hub_uploads_checkpoint_with_model_card(tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = tiny_model()
    url = model.push_to_hub("genie-org/pushed", token="t0k")
    assert url == "https://hub.example/commit/1" and uploaded["repo"] == "genie-org/pushed"
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded["files"])
    card = uploaded["files"]["README.md"].decode()
    assert card.startswith("---\n") and "library_name: genie-env" in card and "genie-org/pushed" in card


def test_write_tiny_checkpoint_fixture_round_trips(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "x", seed=9)
    assert Genie.from_pretrained(path).config.image_size == 16
