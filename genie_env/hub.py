"""Checkpoints: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``, safetensors only.

A release checkpoint is a folder (or a hub repo) holding ``config.json`` (the `GenieConfig`),
``model.safetensors``, and optionally the files the environment uses: ``prompts.npz`` (a bank of real
prompt frames) and ``action_map.json`` (which latent action moves left, right, jumps).

Loading treats every checkpoint as untrusted: the config is validated field by field, then compared
with the safetensors *header* (names, shapes, dtypes) on a model built on the meta device, so a config
asking for absurd sizes, or weights that do not match it, are refused before any memory is allocated;
weights holding NaN or infinity are refused. Nothing is ever unpickled.

This is written on top of ``huggingface_hub``'s download and upload functions rather than
``PyTorchModelHubMixin``, because the mixin builds the model from the config before it could check the
weights against it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch

from genie_env.config import ConfigError, GenieConfig

# The dependency runs one way: models.genie imports this module (HubMixin), never the reverse; the
# model class reaches the loader as `cls`.
M = TypeVar("M", bound="HubMixin")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EXTRA_FILES = ("prompts.npz", "action_map.json", "README.md", "samples.png", "keyboard.png")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out``. Where the system can swap folders atomically,
    ``out`` is never missing or half written, whatever instant the process dies at; elsewhere there is a
    moment between two renames when it is absent. ``tmp`` ends up holding the previous contents (or
    nothing) for the caller to delete."""
    if not out.exists():
        tmp.rename(out)
    elif not _exchange(tmp, out):
        old = out.with_name(f".{out.name}.tmp-old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)


def recover_interrupted_save(out: Path) -> None:
    """Undo what a `save_pretrained` into ``out`` that was killed left behind: put back a previous folder
    left aside between the fallback's two renames, and delete half-written temp folders."""
    old = out.with_name(f".{out.name}.tmp-old")
    if not out.exists() and old.is_dir():
        old.rename(out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match its config."""


def default_weights_dir() -> Path:
    """Where the shipped default model lives: $GENIE_ENV_WEIGHTS, the installed package's weights/,
    or the source checkout's weights/."""
    env = os.environ.get("GENIE_ENV_WEIGHTS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here / "weights", here.parent / "weights"):
        if (cand / WEIGHTS_NAME).is_file():
            return cand
    return here.parent / "weights"


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor names -> {"dtype", "shape"} from a safetensors file's header, without reading tensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (header length {n} "
                                  f"for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is corrupted: its safetensors header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupted: its header is not a mapping")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        if not isinstance(info, dict) or "shape" not in info or "data_offsets" not in info:
            raise CheckpointError(f"{path} is corrupted: bad header entry for {name!r}")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: the header promises {8 + n + end} bytes, "
                              f"the file has {size}")
    return header


def _kept_float32(name: str) -> bool:
    """Codebooks stay float32 whatever dtype a folder stores its weights in, so that tokens do not change."""
    return "quantizer" in name


def stored_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The dtype a checkpoint folder stores its weights in, as `save_pretrained`'s dtype: torch.float16
    when its (non-codebook) floating-point weights are half precision, None (as loaded) otherwise. A tool
    that rewrites a shipped folder passes it on, so the folder keeps its size."""
    header = read_safetensors_header(Path(folder) / WEIGHTS_NAME)
    floats = [v["dtype"] for k, v in header.items() if v["dtype"] in ("F16", "BF16", "F32", "F64")
              and not _kept_float32(k)]
    return torch.float16 if floats and all(d == "F16" for d in floats) else None


def load_config(path: Path) -> GenieConfig:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not a text file: {e}") from e
    try:
        return GenieConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _expected_state(model_cls: type, config: GenieConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        model = model_cls(config)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_weights_match(model_cls: type, config: GenieConfig, header: dict, where: Path) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped tensors of a model_cls(config)."""
    expected = _expected_state(model_cls, config)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    bad = []
    for name in sorted(set(expected) & set(header)):
        shape, dtype = expected[name]
        got_shape = tuple(header[name]["shape"])
        got_dtype = _DTYPES.get(header[name].get("dtype"))
        if got_shape != shape:
            bad.append(f"{name}: config expects {list(shape)}, file has {list(got_shape)}")
        elif got_dtype is None or (got_dtype.is_floating_point != dtype.is_floating_point):
            bad.append(f"{name}: unsupported dtype {header[name].get('dtype')}")
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if extra:
            parts.append(f"unexpected tensors: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
        if bad:
            parts.append("mis-shaped tensors: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
        raise CheckpointError(f"{where}: config.json does not match the weights: " + " | ".join(parts))


def _resolve(name_or_path: str | os.PathLike | None, revision: str | None, local_files_only: bool) -> Path:
    """A local folder holding the checkpoint files (downloading from the hub when given a repo id)."""
    if name_or_path is None:
        folder = default_weights_dir()
        if not (folder / WEIGHTS_NAME).is_file():
            raise CheckpointError(
                f"no shipped default model in {folder}: the trained weights are not there yet. "
                "Pass a checkpoint folder or hub repo id, e.g. Genie.from_pretrained('runs/x/dynamics/release')"
            )
        return folder
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_local = path.is_absolute() or text.startswith((".", "~")) or os.sep in text and text.count("/") != 1
    if looks_local or path.exists():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    return _download(text, revision, local_files_only)


def _download(repo_id: str, revision: str | None, local_files_only: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        cfg = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, local_files_only=local_files_only)
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, local_files_only=local_files_only)
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"hub repo {repo_id!r} not found (or private): check the id, or pass a "
                              "local checkpoint folder") from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"revision {revision!r} not found in hub repo {repo_id!r}") from e
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: test it first)
        raise CheckpointError(
            f"cannot download {repo_id!r}: no network connection to the hub and no cached copy. "
            "Load a local checkpoint folder instead: Genie.from_pretrained('path/to/folder')"
        ) from e
    except EntryNotFoundError as e:
        raise CheckpointError(f"hub repo {repo_id!r} has no {CONFIG_NAME} and {WEIGHTS_NAME}: "
                              "it is not a genie-env checkpoint") from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot download {repo_id!r} from the hub: {e}. "
                              "Load a local checkpoint folder instead: Genie.from_pretrained('path/to/folder')"
                              ) from e
    folder = Path(cfg).parent
    for name in EXTRA_FILES:
        try:
            hf_hub_download(repo_id, name, revision=revision, local_files_only=local_files_only)
        except Exception:  # optional files: absent is fine
            pass
    return folder


class HubMixin:
    """save_pretrained / from_pretrained / push_to_hub for `Genie`."""

    config: GenieConfig
    extra_files: dict[str, Path]

    def save_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        extra_files: dict[str, str | os.PathLike] | None = None) -> Path:
        """Write config.json + model.safetensors (+ shipped extra files) to a folder, atomically.

        dtype: store floating-point weights in this dtype (e.g. torch.float16 to halve the size); the
        codebooks always stay float32 so that tokens do not change.
        """
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_save(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is an ordinary folder
        try:
            state = {}
            for k, v in self.state_dict().items():  # type: ignore[attr-defined]
                v = v.detach().cpu()
                if dtype is not None and v.is_floating_point() and not _kept_float32(k):
                    v = v.to(dtype)
                state[k] = v.contiguous().clone()
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "genie-env"})
            (tmp / WEIGHTS_NAME).chmod(0o644)  # written private; a released model is an ordinary file
            self.config.to_json(tmp / CONFIG_NAME)
            files = {**{k: Path(v) for k, v in self.extra_files.items()},
                     **{k: Path(v) for k, v in (extra_files or {}).items()}}
            for name, src in files.items():
                if src.is_file() and src.resolve() != (out / name).resolve():
                    shutil.copyfile(src, tmp / name)
                elif (out / name).is_file():
                    shutil.copyfile(out / name, tmp / name)
            _publish(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        self.extra_files = {name: out / name for name in files if (out / name).is_file()}
        return out

    @classmethod
    def from_pretrained(cls: type[M], name_or_path: str | os.PathLike | None = None, revision: str | None = None,
                        device: str | torch.device = "cpu", local_files_only: bool = False) -> M:
        """Load a checkpoint: None = the shipped default model, a local folder, or a hub repo id."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = _resolve(name_or_path, revision, local_files_only)
        cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise CheckpointError(f"{folder} is not a genie-env checkpoint: {p.name} is missing")
        config = load_config(cfg_path)
        header = read_safetensors_header(w_path)
        check_weights_match(cls, config, header, folder)
        try:
            state = load_file(str(w_path), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{w_path} cannot be read: {e}") from e
        for k, v in state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CheckpointError(f"{w_path}: tensor {k} holds NaN or infinite values")
        model = cls(config)  # type: ignore[call-arg]
        ref = model.state_dict()
        model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
        model.extra_files = {name: folder / name for name in EXTRA_FILES if (folder / name).is_file()}
        return model.to(device).eval()

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    commit_message: str = "Upload genie-env checkpoint", dtype: torch.dtype | None = None) -> str:
        """Upload the checkpoint (with a model card) to a hub repo; returns the commit URL."""
        from huggingface_hub import HfApi

        with tempfile.TemporaryDirectory() as d:
            folder = self.save_pretrained(Path(d) / "ckpt", dtype=dtype)
            if not (folder / "README.md").is_file():
                (folder / "README.md").write_text(model_card(self.config, repo_id))
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
        return str(getattr(info, "commit_url", info))


def model_card(config: GenieConfig, repo_id: str = "") -> str:
    """A minimal hub model card for a checkpoint that has none."""
    return (
        "---\nlibrary_name: genie-env\ntags:\n- world-model\n- genie\n- gymnasium\n---\n\n"
        f"# {repo_id or 'Genie world model'}\n\n"
        "A Genie world model (video tokenizer, latent action model, MaskGIT dynamics) for genie-env.\n\n"
        "```python\nfrom genie_env import Genie\n"
        f"model = Genie.from_pretrained({repo_id!r})\n```\n\n"
        f"Config: {config.image_size}x{config.image_size} frames, {config.tokens_per_frame} tokens per frame, "
        f"{config.action_vocab_size} latent actions, dynamics {config.dynamics_depth} x {config.dynamics_dim}.\n"
    )
