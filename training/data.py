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

from genie_env.media import read_video

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


class KeyClipSampler(ClipSampler):
    """A `ClipSampler` whose clips also carry the recorded keys, as latent actions through an action map.

    A share ``share`` of the clips (drawn per clip) gets, for each transition t -> t+1, the latent action
    ``action_map[group]`` of the key group recorded for it (``action_groups`` in the video's JSON; LEFT,
    RIGHT+UP, ...); the other clips, and transitions whose video records no keys, get -1 (the stage infers
    their latent action from the frames, as without this sampler). This teaches the dynamics what a key
    does in every state, where the latent action model names what the frames did: RIGHT against a wall
    or UP in mid-air changes little, while the latent inferred there is that of standing still.
    """

    def __init__(self, cache: FrameCache, num_frames: int, action_map: dict[str, int], share: float,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(cache, num_frames, seed=seed, rank=rank, world_size=world_size)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"key_actions={share}: the share of clips driven by recorded keys must be in [0, 1]")
        self.share = float(share)
        self.keys: list[np.ndarray | None] = []
        for e in cache.videos:
            meta = load_actions(cache.data_dir, e.name) or {}
            groups = meta.get("action_groups")
            if not groups:
                self.keys.append(None)
                continue
            lat = np.array([action_map.get(g, -1) for g in groups[: e.frames - 1]], np.int64)
            self.keys.append(np.pad(lat, (0, e.frames - 1 - len(lat)), constant_values=-1))
        self.keyed_videos = sum(k is not None for k in self.keys)
        if share > 0 and not self.keyed_videos:
            raise DatasetError(f"key_actions={share}: no video in {cache.data_dir} records its keys "
                               "(action_groups in video_*.json, as training.record writes them)")

    def sample(self, batch: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        """{"frames": (batch, T, H, W, 3) uint8, "key_actions": (batch, T - 1) int64, -1 = infer}."""
        draws = self.draw(batch)
        keyed = self.rng.random(batch) < self.share
        frames = np.stack([self.cache.clip(v, s, self.num_frames) for v, s in draws])
        acts = np.full((batch, self.num_frames - 1), -1, np.int64)
        for b, (v, s) in enumerate(draws):
            if keyed[b] and self.keys[v] is not None:
                acts[b] = self.keys[v][s : s + self.num_frames - 1]
        return {"frames": frames, "key_actions": acts}


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


def group_of_action(names: list[str], action: int) -> str:
    """The platformer group (LEFT, RIGHT+UP, NONE, ...) of a recorded game action, by its name."""
    from training.record import action_group

    name = names[action]
    return action_group(() if name == "NONE" else tuple(name.split("+")))


class OutcomeSampler:
    """Transitions t -> t+1 with their recorded outcome, for the reward stage.

    Reads the outcomes stored beside each video (``rewards``, ``terminated``, ``end``; see
    `training.record`). Every event of a recording sits on the transition out of a video's last frame
    (the episode's end, stored as ``end``), which has no next frame in the video; a share
    ``end_fraction`` of each batch is drawn from those end transitions, the rest uniformly from all
    transitions. ``weight`` turns each draw back into the recording's own distribution (importance
    weights: natural probability / sampling probability).

    A sample holds the ``k`` frames up to frame t (the first frame repeated where the video starts later)
    and frame t+1 (frame t again for an end transition, flagged by ``is_end``), the true action's group
    for end transitions (their latent action cannot be inferred without frame t+1) and the two events.
    """

    def __init__(self, cache: FrameCache, end_fraction: float = 0.25, seed: int = 0) -> None:
        self.cache = cache
        self.end_fraction = float(end_fraction)
        counts, events, end_video, end_group, end_events = [], [], [], [], []
        pos_rewards: list[float] = []
        missing = 0
        self.natural = True
        """False for a recording of episode endings only (``training.record --episode-ends``): its frames are
        not the game's distribution, only its ends and the frames just before them are used."""
        for v, e in enumerate(cache.videos):
            meta = load_actions(cache.data_dir, e.name)
            if meta is not None and meta.get("episode_ends"):
                self.natural = False
            if meta is None or "rewards" not in meta:
                missing += 1
                counts.append(0)
                events.append(np.zeros((0, 2), dtype=np.float32))
                continue
            n = min(e.frames - 1, len(meta["rewards"]))
            ev = np.zeros((n, 2), dtype=np.float32)
            ev[:, 0] = np.asarray(meta["rewards"][:n], dtype=np.float64) > 0
            ev[:, 1] = np.asarray(meta.get("terminated", [False] * n)[:n], dtype=bool)
            counts.append(n)
            events.append(ev)
            pos_rewards += [float(r) for r in meta["rewards"][:n] if r > 0]
            end = meta.get("end")
            if end is not None and n == e.frames - 1:
                pos_rewards += [float(end["reward"])] if end["reward"] > 0 else []
                end_video.append(v)
                end_group.append(group_of_action(meta["action_names"], int(end["action"])))
                end_events.append([float(end["reward"] > 0), float(bool(end["terminated"]))])
        if missing == len(cache.videos):
            raise DatasetError(
                f"no video in {cache.data_dir} has recorded outcomes (rewards/terminated/end in its .json): "
                "record the dataset with `python -m training.record`, which stores them")
        self.events = events
        self.cum = np.cumsum(counts)
        self.end_video = np.array(end_video, dtype=np.int64)
        self.end_group = end_group
        self.end_events = np.array(end_events, dtype=np.float32).reshape(-1, 2)
        self.num_transitions = int(self.cum[-1]) + len(end_video)
        self.mean_event_reward = float(np.mean(pos_rewards)) if pos_rewards else 1.0
        """The mean reward of a reward event (what the env returns when the reward head fires)."""
        self.rng = np.random.default_rng([seed, 7])

    def event_counts(self) -> dict[str, int]:
        inside = np.concatenate(self.events) if self.events else np.zeros((0, 2))
        both = np.concatenate([inside, self.end_events])
        return {"transitions": self.num_transitions, "reward_events": int(both[:, 0].sum()),
                "terminations": int(both[:, 1].sum()),
                "reward_events_that_ended": int(((both[:, 0] > 0) & (both[:, 1] > 0)).sum())}

    def transition(self, p: int) -> tuple[int, int, int]:
        """Transition number p in [0, num_transitions) -> (video, frame t, end index or -1): first every
        transition inside a video, then the end transitions."""
        n_inside = int(self.cum[-1])
        if p >= n_inside:
            j = p - n_inside
            v = int(self.end_video[j])
            return v, self.cache.videos[v].frames - 1, j
        v = int(np.searchsorted(self.cum, p, side="right"))
        return v, int(p - (self.cum[v - 1] if v else 0)), -1

    def sample(self, batch: int, k: int) -> dict[str, np.ndarray | list[str]]:
        """``batch`` random transitions with ``k`` context frames (see `gather`), ``end_fraction`` of them
        from the end transitions."""
        n_inside, n_end = int(self.cum[-1]), len(self.end_video)
        f = self.end_fraction if n_end else 0.0
        picks = [n_inside + int(self.rng.integers(n_end)) if self.rng.random() < f
                 else int(self.rng.integers(self.num_transitions)) for _ in range(batch)]
        out = self.gather(picks, k)
        # natural probability 1/N against sampling probability (1-f)/N + f/E for an end transition
        out["weight"] = (1.0 / ((1 - f) + out["is_end"] * (f * self.num_transitions / max(n_end, 1)))
                         ).astype(np.float32)
        return out

    def gather(self, picks: list[int], k: int) -> dict[str, np.ndarray | list[str]]:
        """Transitions by number: frames (b, k+1, H, W, 3) uint8 (frames t-k+1 .. t+1), events (b, 2)
        float, is_end (b,) bool, group (b,) str ("" inside a video), weight (b,) ones."""
        frames, events, is_end, group = [], [], [], []
        for p in picks:
            v, t, j = self.transition(p)
            events.append(self.end_events[j] if j >= 0 else self.events[v][t])
            group.append(self.end_group[j] if j >= 0 else "")
            is_end.append(j >= 0)
            last = self.cache.videos[v].frames - 1
            idx = np.clip(np.arange(t - k + 1, t + 2), 0, last)
            start = int(idx[0])
            clip = self.cache.clip(v, start, int(idx[-1]) - start + 1)
            frames.append(clip[idx - start])
        return {"frames": np.stack(frames), "events": np.stack(events).astype(np.float32),
                "is_end": np.array(is_end), "group": group, "weight": np.ones(len(picks), dtype=np.float32)}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
