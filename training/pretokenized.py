"""Pre-tokenised training data: a dataset's tokens and inferred latent actions (or its frames) in one file.

The dynamics stage spends most of a step on work that never changes while it trains: the frozen tokenizer
encoding every clip and the frozen latent action model inferring its actions. `training.pretokenize` does
that once for the whole dataset and writes one compact file (300,000 frames of 64 tokens: about 40 MB) that
a machine with no network and no video decoder can train from; a frames file does the same for the
tokenizer stage (raw uint8 frames, one file instead of a folder of videos and its cache).

Both are safetensors files (readable with ``safetensors.safe_open``), memory-mapped here:

- ``tokens`` uint16 (N, h, w): every frame of every video, videos back to back in `FrameCache` order;
  ``frames`` uint8 (N, H, W, 3) in a frames file instead;
- ``actions`` uint8 (N, k) (tokens file): the latent action of the transition i -> i+1 as the latent action
  model infers it inside a clip that starts p frames before frame i, for p = 0 .. k-1 (k =
  ``lam_context_frames``; column k-1 holds every longer history). The model sees the k frames up to x_i and
  pads a clip's start by repeating its first frame, so the first k-1 transitions of a clip get other
  actions than the same transitions in mid-clip; keeping each variant makes a clip read from the file get
  exactly the actions that inferring them on its frames gives. 255 on a video's last frame.
- ``video_frames``, ``video_offsets`` int64 (V,): the video boundaries (clips never cross them);
- ``rewards`` float32, ``terminated`` uint8 (N,): the outcome of the transition i -> i+1 from the videos'
  JSON (0 on a video's last frame and where a video has none, see ``has_outcomes`` (V,));
  ``end_action`` int16 (-1: none), ``end_reward`` float32, ``end_terminated``, ``end_truncated``, ``has_end``
  uint8 (V,): the episode's final transition, which is not in the video.

The metadata (``__metadata__["genie_env"]``, JSON) names the kind, the source release and the hash of its
tokenizer and latent action weights: training refuses a tokens file made with other weights than the
run's, with a message naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import ClipSampler, DatasetError, FrameCache, VideoEntry, load_actions, to_tensor

FORMAT = "genie-env-pretokenized"
VERSION = 1
NO_ACTION = 255
_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I16": np.int16, "I64": np.int64, "F32": np.float32}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
# config fields a tokens file depends on: a run whose model differs in any of them cannot use it
_CONFIG_KEYS = ("image_size", "in_channels", "tokenizer_vocab_size", "tokenizer_patch_size", "action_vocab_size",
                "lam_context_frames")


class PretokenizedError(DatasetError):
    """A pre-tokenised file is missing, corrupted, or does not belong to the run's model."""


def is_pretokenized(path: str | Path) -> bool:
    """True when ``path`` is a file (a pre-tokenised or frames file) rather than a dataset folder."""
    return Path(path).is_file()


def file_kind(path: str | Path) -> str | None:
    """"tokens" or "frames" for a file made here, None for a dataset folder; a clear error otherwise."""
    return _open(Path(path))[0].get("kind") if Path(path).is_file() else None


def parts_hash(model: torch.nn.Module) -> str:
    """SHA-256 of the tokenizer's and latent action model's tensors (float32 bytes, sorted by name): the
    identity of what made a tokens file."""
    h = hashlib.sha256()
    for part in ("tokenizer", "latent_actions"):
        state = getattr(model, part).state_dict()
        for name in sorted(state):
            t = state[name].detach().to("cpu", torch.float32 if state[name].is_floating_point() else None)
            h.update(f"{part}.{name}{tuple(t.shape)}".encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- file format
def _write(path: Path, tensors: list[tuple[str, np.dtype, tuple[int, ...], Any]], meta: dict) -> None:
    """Write a safetensors file from chunks (each tensor: name, dtype, shape, iterable of arrays), streaming,
    atomically (temporary file, fsync, rename): the 3.7 GB frames of 300,000 frames never sit in memory."""
    header: dict[str, Any] = {"__metadata__": {"genie_env": json.dumps(meta)}}
    offset = 0
    for name, dtype, shape, _ in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, chunks in tensors:
            written = 0
            for c in chunks:
                c = np.ascontiguousarray(c, dtype=dtype)
                f.write(c.tobytes())
                written += c.size
            if written != int(np.prod(shape, dtype=np.int64)):
                raise RuntimeError(f"{name}: wrote {written} values for shape {shape}")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _open(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The metadata and memory-mapped arrays of a file written by `_write`; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PretokenizedError(f"pre-tokenised file not found: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n + 8 > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        meta = json.loads(header.pop("__metadata__")["genie_env"])
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise PretokenizedError(
            f"{path} is not a pre-tokenised file ({e}): pass a dataset folder, or make one with "
            "`python -m training.pretokenize`") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise PretokenizedError(f"{path} is a {meta.get('format')} v{meta.get('version')} file; this version "
                                f"reads {FORMAT} v{VERSION}: make it again with `python -m training.pretokenize`")
    arrays = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise PretokenizedError(f"{path} is truncated ({size} bytes, its header promises {8 + n + end}): "
                                    "make it again with `python -m training.pretokenize`")
        shape = tuple(info["shape"])
        arrays[name] = (np.memmap(path, dtype=_DTYPES[info["dtype"]], mode="r", offset=8 + n + start, shape=shape)
                        if end > start else np.zeros(shape, _DTYPES[info["dtype"]]))
    return meta, arrays


# ---------------------------------------------------------------------------------------------- readers
class _FileSource:
    """What `ClipSampler` needs from a dataset (``videos``, ``clip``, ``total_frames``), read from a file."""

    kind = ""

    def __init__(self, path: str | Path) -> None:
        self.path = self.data_dir = Path(path)
        self.meta, self.arrays = _open(self.path)
        if self.meta.get("kind") != self.kind:
            raise PretokenizedError(f"{self.path} is a {self.meta.get('kind')} file, not a {self.kind} file")
        names = self.meta["video_names"]
        frames, offsets = self.arrays["video_frames"], self.arrays["video_offsets"]
        self.videos = [VideoEntry(name=str(nm), shard=0, offset=int(o), frames=int(f))
                       for nm, o, f in zip(names, offsets, frames)]
        if not self.videos:
            raise PretokenizedError(f"{self.path} holds no video")

    @property
    def total_frames(self) -> int:
        return sum(e.frames for e in self.videos)

    def _span(self, video: int, start: int, length: int) -> slice:
        e = self.videos[video]
        if start < 0 or start + length > e.frames:
            raise IndexError(f"clip {start}:{start + length} outside video {video} ({e.frames} frames)")
        return slice(e.offset + start, e.offset + start + length)


class FrameFile(_FileSource):
    """A frames file: a drop-in for `FrameCache` (any stage trains from it)."""

    kind = "frames"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.image_size = int(self.meta["image_size"])

    def clip(self, video: int, start: int, length: int) -> np.ndarray:
        """(length, H, W, 3) uint8 frames of one video."""
        return np.asarray(self.arrays["frames"][self._span(video, start, length)])


class TokenFile(_FileSource):
    """A tokens file: tokens and inferred latent actions per frame (the dynamics stage trains from it)."""

    kind = "tokens"

    def clip(self, video: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(length, h, w) uint16 tokens and the (length - 1,) uint8 latent actions of its transitions, as
        inferring them on the clip's own frames would give."""
        sl = self._span(video, start, length)
        acts = self.arrays["actions"][sl.start : sl.stop - 1]
        cols = np.minimum(np.arange(length - 1), acts.shape[1] - 1)
        return np.asarray(self.arrays["tokens"][sl]), np.asarray(acts[np.arange(length - 1), cols])

    def clip_outcomes(self, video: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The (length - 1,) rewards (float32) and terminations (bool) of a clip's transitions."""
        sl = self._span(video, start, length)
        return (np.asarray(self.arrays["rewards"][sl.start : sl.stop - 1]),
                np.asarray(self.arrays["terminated"][sl.start : sl.stop - 1]).astype(bool))

    def check_model(self, model: torch.nn.Module, bf16: bool | None = None, log=print) -> None:
        """Refuse a model whose tokenizer or latent action model is not the one that made this file; say so
        when the file was made under another autocast than the run's (``bf16``), whose tokens can differ in
        a few places from those the run would compute from the videos."""
        cfg = model.config.to_dict()
        mine = {k: cfg[k] for k in _CONFIG_KEYS}
        if mine != self.meta["config"]:
            diff = ", ".join(f"{k}: file {self.meta['config'].get(k)} vs run {v}" for k, v in mine.items()
                             if self.meta["config"].get(k) != v)
            raise PretokenizedError(f"{self.path} was made for another model configuration ({diff}): tokenise the "
                                    "data again with this run's tokenizer (`python -m training.pretokenize`)")
        h = parts_hash(model)
        if h != self.meta["parts_hash"]:
            raise PretokenizedError(
                f"{self.path} was tokenised with the tokenizer and latent action model of {self.meta['source']} "
                f"(weights {self.meta['parts_hash'][:12]}), but this run's are {h[:12]}: train from the "
                f"videos, start the stage from that release (--init-from {self.meta['source']}), or tokenise "
                "again with `python -m training.pretokenize --checkpoint RELEASE` for the release this run uses")
        if bf16 is not None and bf16 != self.meta.get("bf16"):
            log(f"note: {self.path} was tokenised with bf16={self.meta.get('bf16')}, this run has bf16={bf16}; "
                "a few tokens may differ from those of the videos (make it with --bf16/--no-bf16 to match)")


class TokenClipSampler(ClipSampler):
    """`ClipSampler` over a tokens file: the same seed draws the same (video, start) clips as over the
    videos the file was made from, and returns their tokens and latent actions instead of frames."""

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch, T, h, w) uint16 tokens and (batch, T - 1) uint8 latent actions."""
        toks, acts = zip(*(self.cache.clip(v, s, self.num_frames) for v, s in self.draw(batch)))
        return np.stack(toks), np.stack(acts)


def open_training_data(data: str | Path, stage: str, image_size: int, log=print):
    """A dataset folder (decoded into a `FrameCache`), a frames file or a tokens file (dynamics and reward
    stages only), checked against the stage's image size."""
    if not is_pretokenized(data):
        return FrameCache(data, image_size, log=log)
    meta, _ = _open(Path(data))
    if meta.get("kind") == "tokens":
        if stage in ("tokenizer", "lam"):
            raise PretokenizedError(
                f"--data {data} holds tokens, not frames: the {stage} stage trains on frames; pass the dataset "
                "folder or a frames file (`python -m training.pretokenize --frames-out FILE`)")
        src: _FileSource = TokenFile(data)
    else:
        src = FrameFile(data)
    size = int(meta["config"]["image_size"] if meta.get("kind") == "tokens" else meta["image_size"])
    if size != image_size:
        raise PretokenizedError(f"{data} holds {size}x{size} frames; the run's image_size is {image_size}")
    log(f"training data: {data} ({meta['kind']} file, {src.total_frames} frames in {len(src.videos)} videos)")
    return src


def make_sampler(source, num_frames: int, seed: int, rank: int = 0, world_size: int = 1) -> ClipSampler:
    cls = TokenClipSampler if isinstance(source, TokenFile) else ClipSampler
    return cls(source, num_frames, seed=seed, rank=rank, world_size=world_size)


def to_batch(sample, device: torch.device) -> dict[str, torch.Tensor]:
    """A sampler's draw as the keyword arguments of the stage's loss, on ``device``."""
    if isinstance(sample, tuple):
        tokens, actions = sample
        return {"tokens": torch.from_numpy(tokens.astype(np.int64)).flatten(2).to(device, non_blocking=True),
                "actions": torch.from_numpy(actions.astype(np.int64)).to(device, non_blocking=True)}
    if isinstance(sample, dict):  # frames and the recorded keys' latent actions (training.data.KeyClipSampler)
        return {"frames": to_tensor(sample["frames"]).to(device, non_blocking=True),
                "key_actions": torch.from_numpy(sample["key_actions"]).to(device, non_blocking=True)}
    return {"frames": to_tensor(sample).to(device, non_blocking=True)}


# ---------------------------------------------------------------------------------------------- writers
def _outcomes(data_dir: Path, videos: list[VideoEntry]) -> dict[str, np.ndarray]:
    """Per-transition rewards / terminations and the episode's end per video, from the videos' JSON."""
    n = sum(e.frames for e in videos)
    out = {"rewards": np.zeros(n, np.float32), "terminated": np.zeros(n, np.uint8),
           "has_outcomes": np.zeros(len(videos), np.uint8), "end_action": np.full(len(videos), -1, np.int16),
           "end_reward": np.zeros(len(videos), np.float32), "end_terminated": np.zeros(len(videos), np.uint8),
           "end_truncated": np.zeros(len(videos), np.uint8), "has_end": np.zeros(len(videos), np.uint8)}
    off = 0
    for v, e in enumerate(videos):
        meta = load_actions(data_dir, e.name) or {}
        if "rewards" in meta and "terminated" in meta:
            r = np.asarray(meta["rewards"], np.float32)[: e.frames - 1]
            t = np.asarray(meta["terminated"], np.uint8)[: e.frames - 1]
            out["rewards"][off : off + len(r)] = r
            out["terminated"][off : off + len(t)] = t
            out["has_outcomes"][v] = 1
        end = meta.get("end")
        if isinstance(end, dict):
            out["has_end"][v] = 1
            out["end_action"][v] = -1 if end.get("action") is None else int(end["action"])
            out["end_reward"][v] = float(end.get("reward", 0.0))
            out["end_terminated"][v] = bool(end.get("terminated", False))
            out["end_truncated"][v] = bool(end.get("truncated", False))
        off += e.frames
    return out


_OUTCOME_KEYS = ("rewards", "terminated", "has_outcomes", "end_action", "end_reward", "end_terminated",
                 "end_truncated", "has_end")


def _boundaries(videos: list[VideoEntry]) -> tuple[np.ndarray, np.ndarray]:
    frames = np.array([e.frames for e in videos], np.int64)
    return frames, np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64)


def _common(cache: FrameCache) -> tuple[list[tuple], dict]:
    frames, offsets = _boundaries(cache.videos)
    if isinstance(cache, FrameFile):  # outcomes were read from the videos' JSON when it was made
        n, v = int(frames.sum()), len(cache.videos)
        outcomes = {k: cache.arrays[k][:v] if cache.arrays[k].shape[0] == len(cache.meta["video_names"])
                    else cache.arrays[k][:n] for k in _OUTCOME_KEYS}
    else:
        outcomes = _outcomes(cache.data_dir, cache.videos)
    extra = [(k, a.dtype, a.shape, [a]) for k, a in outcomes.items()]
    return [("video_frames", frames.dtype, frames.shape, [frames]),
            ("video_offsets", offsets.dtype, offsets.shape, [offsets]), *extra], \
        {"format": FORMAT, "version": VERSION, "data": str(cache.data_dir),
         "video_names": [e.name for e in cache.videos], "frames": int(frames.sum())}


def write_frames_file(cache: FrameCache, out: str | Path) -> Path:
    """All frames of a dataset, uint8, with its video boundaries and outcomes, in one file."""
    out = Path(out)
    n = cache.total_frames
    s = cache.image_size
    tensors, meta = _common(cache)
    chunks = (cache.clip(v, 0, e.frames) for v, e in enumerate(cache.videos))
    _write(out, [("frames", np.uint8, (n, s, s, 3), chunks), *tensors],
           {**meta, "kind": "frames", "image_size": s})
    return out


@torch.inference_mode()
def infer_video(model, frames: np.ndarray, batch: int, autocast) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (T, h, w) and the latent-action table (T, k) of one video's (T, H, W, 3) uint8 frames."""
    dev = model.device
    k = model.config.lam_context_frames
    x = to_tensor(np.array(frames)[None])[0].to(dev)  # (3, T, H, W)
    t = x.shape[1]
    toks = []
    with autocast:
        for i in range(0, t, batch):
            # one frame per batch row: a frame's tokens depend on that frame alone
            toks.append(model.tokenizer.encode(x[:, i : i + batch].transpose(0, 1)[:, :, None])[:, 0])
        acts = np.full((t, k), NO_ACTION, np.uint8)
        # column k-1, full history: the whole video in overlapping chunks, each chunk's first k-1
        # transitions (padded history) dropped except at the video's start
        for s in range(0, t - 1, batch):
            lo = max(0, s - (k - 1))
            a = model.latent_actions.infer(x[None, :, lo : min(t, s + batch + 1)])[0]
            acts[s : s + a.numel() - (s - lo), k - 1] = a[s - lo :].cpu().numpy()
        for p in range(k - 1):
            # row i: the clip x_{i-p} .. x_{i+1}, whose last transition is i -> i+1 with p frames of history
            idx = list(range(p, t - 1))
            for j in range(0, len(idx), batch):
                rows = idx[j : j + batch]
                clips = torch.stack([x[:, r - p : r + 2] for r in rows])  # (b, 3, p+2, H, W)
                acts[rows, p] = model.latent_actions.infer(clips)[:, -1].cpu().numpy()
        for p in range(k):  # a clip cannot start before the video: fewer frames of history
            for i in range(min(p, t - 1)):
                acts[i, p] = acts[i, i]
    tok = torch.cat(toks).cpu().numpy() if toks else np.zeros((0,) + (model.config.token_grid,) * 2)
    return tok.astype(np.uint16), acts


def write_tokens_file(model, cache: FrameCache, out: str | Path, source: str, batch: int = 256,
                      bf16: bool | None = None, log=print) -> Path:
    """Tokenise every video of ``cache`` with ``model``'s tokenizer and infer its latent actions; one file.
    ``bf16``: autocast as the dynamics stage would (default: the model config's ``bf16``); the tokens are
    coded in float32 either way (`float32_encoding`), so a file's tokens do not depend on the machine."""
    import time

    out = Path(out)
    cfg = model.config
    if cfg.tokenizer_vocab_size > 65536:
        raise ValueError(f"tokenizer_vocab_size {cfg.tokenizer_vocab_size} does not fit uint16 tokens")
    if cfg.action_vocab_size >= NO_ACTION:
        raise ValueError(f"action_vocab_size {cfg.action_vocab_size} does not fit uint8 actions")
    if cache.image_size != cfg.image_size:
        raise ValueError(f"the frames are {cache.image_size}x{cache.image_size}; the model takes {cfg.image_size}")
    if cfg.tokenizer_context:
        raise ValueError("this tokenizer codes each frame against the one decoded before it, so a clip's tokens "
                         "depend on where the clip starts (play codes a prompt from its first frame): pre-tokenised "
                         "files do not hold that yet; train the dynamics from the frames (--data FOLDER)")
    bf16 = cfg.bf16 if bf16 is None else bf16
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)
    model.eval()
    n, g, k = cache.total_frames, cfg.token_grid, cfg.lam_context_frames
    tokens = np.zeros((n, g, g), np.uint16)
    actions = np.full((n, k), NO_ACTION, np.uint8)
    _, offsets = _boundaries(cache.videos)
    t0 = last = time.time()
    for v, (e, off) in enumerate(zip(cache.videos, offsets)):
        tokens[off : off + e.frames], actions[off : off + e.frames] = infer_video(
            model, cache.clip(v, 0, e.frames), batch, autocast)
        if time.time() - last > 30 or v == len(cache.videos) - 1:
            done = off + e.frames
            log(f"tokenised {done}/{n} frames ({done / max(time.time() - t0, 1e-9):.0f} frames/s)")
            last = time.time()
    tensors, meta = _common(cache)
    meta.update({"kind": "tokens", "source": source, "parts_hash": parts_hash(model), "bf16": bool(bf16),
                 "config": {key: cfg.to_dict()[key] for key in _CONFIG_KEYS}})
    _write(out, [("tokens", np.uint16, tokens.shape, [tokens]), ("actions", np.uint8, actions.shape, [actions]),
                 *tensors], meta)
    return out


class ArraySource:
    """Videos held in memory, in the shape of a `FrameCache` (``videos``, ``clip``, ``total_frames``,
    ``image_size``, ``data_dir``): lets the writers make files where no video decoder is installed."""

    def __init__(self, videos: list[np.ndarray], data_dir: str | Path = ".") -> None:
        if not videos or any(v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8 for v in videos):
            raise ValueError("videos must be a non-empty list of (T, H, W, 3) uint8 arrays")
        self.arrays = videos
        self.data_dir = Path(data_dir)
        self.image_size = int(videos[0].shape[1])
        self.videos = [VideoEntry(name=f"video_{i:06d}.mp4", shard=0, offset=0, frames=len(v))
                       for i, v in enumerate(videos)]

    @property
    def total_frames(self) -> int:
        return sum(e.frames for e in self.videos)

    def clip(self, video: int, start: int, length: int) -> np.ndarray:
        return self.arrays[video][start : start + length]


def write_subset(path: str | Path, out: str | Path, max_frames: int) -> Path:
    """The first videos of a tokens or frames file, up to ``max_frames`` frames, as a file of the same kind
    (e.g. to fit a transfer limit); the metadata and identity are kept."""
    meta, arrays = _open(Path(path))
    frames = arrays["video_frames"]
    keep = int((np.cumsum(frames) <= max_frames).sum())
    if keep == 0:
        raise ValueError(f"max_frames={max_frames} is shorter than the first video ({int(frames[0])} frames)")
    n = int(frames[:keep].sum())
    per_video = {"video_frames", "video_offsets", "has_outcomes", "end_action", "end_reward", "end_terminated",
                 "end_truncated", "has_end"}
    tensors = []
    for name, arr in arrays.items():
        part = arr[:keep] if name in per_video else arr[:n]
        tensors.append((name, part.dtype, part.shape, [part]))
    _write(Path(out), tensors, {**meta, "video_names": meta["video_names"][:keep], "frames": n,
                                "subset_of": str(path)})
    return Path(out)
