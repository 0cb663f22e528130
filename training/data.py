"""Video dataset: a folder of mp4 decoded once into memory-mapped uint8 shards, clips sampled from it.

Decoding mp4 at every step is about 100x slower than reading raw uint8, so the first use of a dataset
decodes every video into ``DATA/.cache/frames-<size>/`` (raw uint8 shards plus a manifest); later uses
memory-map the shards. The manifest records each video's size and modification time: when the videos
change, the cache is rebuilt. The manifest is written last and atomically, so a cache whose build was
killed has no manifest and is rebuilt; each shard's CRC-32 is checked on open, so a corrupted shard is
detected and rebuilt instead of trained on.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.video import read_video

CACHE_VERSION = 1
SHARD_FRAMES = 65536  # 768 MiB of 64x64 RGB frames per shard


class DatasetError(ValueError):
    """The dataset folder is missing, empty or holds no usable video."""


def _crc(arr: np.ndarray) -> int:
    crc = 0
    flat = arr.reshape(-1)
    step = 1 << 26
    for i in range(0, flat.size, step):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(flat[i : i + step])), crc)
    return crc


def list_videos(data_dir: str | Path) -> list[Path]:
    """The mp4 files of DATA/videos (or DATA itself when it has no videos/ subfolder), sorted."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DatasetError(f"dataset folder not found: {data_dir} (expected {data_dir}/videos/*.mp4)")
    vdir = data_dir / "videos" if (data_dir / "videos").is_dir() else data_dir
    vids = sorted(vdir.glob("*.mp4"))
    if not vids:
        raise DatasetError(
            f"no .mp4 videos in {vdir}: a dataset is a folder with videos/video_000.mp4, ... "
            "(record one with `python -m training.record --out DIR`)"
        )
    return vids


@dataclass
class VideoEntry:
    name: str
    shard: int
    offset: int
    frames: int


class FrameCache:
    """All frames of a dataset as uint8 (N, H, W, 3) memory maps, indexed per video."""

    def __init__(self, data_dir: str | Path, image_size: int = 64, cache_dir: str | Path | None = None,
                 log=print, verify: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.image_size = image_size
        self.cache_dir = Path(cache_dir) if cache_dir else self.data_dir / ".cache" / f"frames-{image_size}"
        self.log = log
        videos = list_videos(self.data_dir)
        signature = [[v.name, v.stat().st_size, v.stat().st_mtime_ns] for v in videos]
        # One process builds or checks the cache at a time (the ranks of a distributed run, two runs on
        # one dataset); the others wait and then find it ready.
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir.parent / (self.cache_dir.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest = self._load_manifest()
            if manifest is None or manifest.get("signature") != signature or manifest.get("version") != CACHE_VERSION:
                manifest = self._build(videos, signature)
            elif verify and not self._verify(manifest):
                self.log(f"frame cache {self.cache_dir} is corrupted (checksum mismatch): rebuilding it")
                manifest = self._build(videos, signature)
        self.manifest = manifest
        self.shards = [
            np.memmap(self.cache_dir / s["file"], dtype=np.uint8, mode="r",
                      shape=(s["frames"], image_size, image_size, 3))
            for s in manifest["shards"]
        ]
        self.videos = [VideoEntry(**v) for v in manifest["videos"]]
        if not self.videos:
            raise DatasetError(f"none of the {len(videos)} videos in {self.data_dir} could be read")

    # ------------------------------------------------------------------ build
    def _load_manifest(self) -> dict | None:
        path = self.cache_dir / "manifest.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            return None

    def _verify(self, manifest: dict) -> bool:
        for s in manifest["shards"]:
            path = self.cache_dir / s["file"]
            expected = s["frames"] * self.image_size * self.image_size * 3
            if not path.is_file() or path.stat().st_size != expected:
                return False
            arr = np.memmap(path, dtype=np.uint8, mode="r")
            if _crc(arr) != s["crc32"]:
                return False
        return True

    def _build(self, videos: list[Path], signature: list) -> dict:
        size = self.image_size
        if self.cache_dir.exists():
            shutil.rmtree(self.cache_dir)
        self.cache_dir.mkdir(parents=True)
        self.log(f"decoding {len(videos)} videos into the frame cache {self.cache_dir} (once)")
        shards: list[dict] = []
        entries: list[dict] = []
        buf: list[np.ndarray] = []
        buf_frames = 0
        unreadable: list[str] = []
        resized = 0

        def write_shard() -> None:
            nonlocal buf, buf_frames
            if not buf:
                return
            arr = np.concatenate(buf)
            name = f"shard_{len(shards):04d}.u8"
            tmp = self.cache_dir / (name + ".part")
            with open(tmp, "wb") as f:
                f.write(arr.tobytes())
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.cache_dir / name)
            shards.append({"file": name, "frames": int(arr.shape[0]), "crc32": _crc(arr)})
            buf, buf_frames = [], 0

        for v in videos:
            try:
                frames = read_video(v)
            except ValueError as e:
                unreadable.append(f"{v.name} ({e})")
                continue
            if frames.shape[0] == 0:
                unreadable.append(f"{v.name} (no frames)")
                continue
            if frames.shape[1:3] != (size, size):
                frames = _resize(frames, size)
                resized += 1
            if buf_frames + frames.shape[0] > SHARD_FRAMES and buf:
                write_shard()
            entries.append({"name": v.name, "shard": len(shards), "offset": buf_frames,
                            "frames": int(frames.shape[0])})
            buf.append(frames)
            buf_frames += frames.shape[0]
        write_shard()
        if unreadable:
            warnings.warn(
                f"skipped {len(unreadable)} unreadable video(s): " + "; ".join(unreadable[:10])
                + (" ..." if len(unreadable) > 10 else ""),
                stacklevel=3,
            )
        if resized:
            warnings.warn(f"resized {resized} video(s) to {size}x{size}", stacklevel=3)
        manifest = {"version": CACHE_VERSION, "image_size": size, "signature": signature,
                    "shards": shards, "videos": entries}
        tmp = self.cache_dir / "manifest.json.part"
        tmp.write_text(json.dumps(manifest))
        tmp.replace(self.cache_dir / "manifest.json")
        return manifest

    # ------------------------------------------------------------------ access
    def clip(self, video: int, start: int, length: int) -> np.ndarray:
        """(length, H, W, 3) uint8 frames of one video."""
        e = self.videos[video]
        return np.asarray(self.shards[e.shard][e.offset + start : e.offset + start + length])

    @property
    def total_frames(self) -> int:
        return sum(e.frames for e in self.videos)


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "nearest")
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


class ClipSampler:
    """Uniform random clips of ``num_frames`` consecutive frames from one video (never crossing videos).

    Its state (a numpy generator) is part of a training checkpoint, so a resumed run draws the same clips
    as an uninterrupted one. With ``world_size`` > 1, rank r samples only from videos i with
    i % world_size == r.
    """

    def __init__(self, cache: FrameCache, num_frames: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, log=print) -> None:
        self.cache = cache
        self.num_frames = num_frames
        ids = [i for i, e in enumerate(cache.videos) if e.frames >= num_frames]
        short = sum(1 for e in cache.videos if e.frames < num_frames)
        if short:
            warnings.warn(f"skipped {short} video(s) shorter than num_frames={num_frames}", stacklevel=2)
        if not ids:
            raise DatasetError(
                f"no video in {cache.data_dir} has at least num_frames={num_frames} frames "
                f"(longest: {max(e.frames for e in cache.videos)})"
            )
        mine = [i for i in ids if i % world_size == rank] or ids
        self.ids = np.array(mine)
        starts = np.array([cache.videos[i].frames - num_frames + 1 for i in mine], dtype=np.int64)
        self.cum = np.cumsum(starts)
        self.rng = np.random.default_rng([seed, rank])

    def draw(self, batch: int) -> list[tuple[int, int]]:
        """The next ``batch`` clips as (video, start) pairs."""
        picks = self.rng.integers(0, self.cum[-1], size=batch)
        out = []
        for p in picks:
            j = int(np.searchsorted(self.cum, p, side="right"))
            out.append((int(self.ids[j]), int(p - (self.cum[j - 1] if j else 0))))
        return out

    def sample(self, batch: int) -> np.ndarray:
        """(batch, T, H, W, 3) uint8."""
        return np.stack([self.cache.clip(v, s, self.num_frames) for v, s in self.draw(batch)])

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def to_tensor(clips: np.ndarray):
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float in [0, 1]."""
    import torch

    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div_(255)


def load_actions(data_dir: str | Path, video_name: str) -> dict | None:
    """The metadata written beside a recorded video (true actions, for evaluation only), if any."""
    data_dir = Path(data_dir)
    vdir = data_dir / "videos" if (data_dir / "videos").is_dir() else data_dir
    path = vdir / (Path(video_name).stem + ".json")
    if not path.is_file():
        return None
    return json.loads(path.read_text())
