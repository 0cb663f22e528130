"""Media I/O in one place: mp4 (PyAV) and gif (Pillow) writing and reading, and single images.

Datasets are written losslessly (`write_video`: H.264 in RGB, libx264rgb qp 0), so pixel art keeps its
colours; any mp4 PyAV can decode is read (`read_video`: converted to RGB, resized to the dataset
resolution when needed). Clips meant for people (`VideoWriter`, `save_video`) are H.264 yuv420p, which
every player opens. Heavy imports (av, PIL) stay inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VideoWriter", "load_image", "read_video", "save_png", "save_video", "write_video"]


class VideoWriter:
    """Frames (H, W, 3) uint8 to an mp4 (H.264 yuv420p, streamed as they come: every player opens it)
    or a gif (kept until `close`). Frames are scaled up by an integer factor with nearest neighbour;
    for mp4 the factor is doubled when needed so both sides are even (yuv420p halves chroma)."""

    def __init__(self, path: str | Path, fps: int = 15, scale: int = 1) -> None:
        self.path = Path(path)
        self.kind = self.path.suffix.lower()
        if self.kind not in (".mp4", ".gif"):
            raise ValueError(f"record path must end in .mp4 or .gif, got {str(path)!r}")
        if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
            raise ValueError(f"fps must be an int >= 1, got {fps!r}")
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be an int >= 1, got {scale!r}")
        self.fps, self.scale = fps, scale
        self.frames_written = 0
        self._gif: list[np.ndarray] = []
        self._container: Any = None
        self._stream: Any = None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        if self.kind == ".gif":
            self._gif.append(frame.copy())
        else:
            self._write_mp4(frame)
        self.frames_written += 1

    def _write_mp4(self, frame: np.ndarray) -> None:
        import av

        k = self.scale
        if (frame.shape[0] * k) % 2 or (frame.shape[1] * k) % 2:
            k *= 2
        big = np.ascontiguousarray(frame.repeat(k, 0).repeat(k, 1))
        if self._container is None:
            self._container = av.open(str(self.path), mode="w", format="mp4")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": "18"}
            self._stream.height, self._stream.width = big.shape[:2]
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(big, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> Path | None:
        """Finish the file; returns its path, or None when no frame was written."""
        if self.kind == ".gif" and self._gif:
            from PIL import Image

            k = self.scale
            images = [Image.fromarray(f.repeat(k, 0).repeat(k, 1)) for f in self._gif]
            images[0].save(self.path, save_all=True, append_images=images[1:], duration=round(1000 / self.fps),
                           loop=0)
            self._gif = []
        elif self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
        return self.path if self.frames_written else None


def save_video(frames: Sequence[np.ndarray] | np.ndarray, path: str | Path, fps: int = 15, scale: int = 1) -> Path:
    """Write (T, H, W, 3) uint8 frames to an mp4 or gif (by the path's suffix); returns the path."""
    writer = VideoWriter(path, fps=fps, scale=scale)
    for f in frames:
        writer.write(np.asarray(f))
    out = writer.close()
    if out is None:
        raise ValueError("frames is empty: nothing to save")
    return out


def load_image(path: str | Path, size: int) -> np.ndarray:
    """An image file as (size, size, 3) uint8 RGB (resized when it is another size)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8).copy()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_video(path: str | Path, frames: np.ndarray, fps: int = 15, lossless: bool = True) -> None:
    """Write (T, H, W, 3) uint8 frames to an mp4 (lossless RGB H.264 by default; yuv420p otherwise,
    which every player opens: use that for clips meant for people, never for datasets)."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        if lossless:
            stream = container.add_stream("libx264rgb", rate=fps)
            stream.pix_fmt = "rgb24"
            stream.options = {"qp": "0", "preset": "veryfast"}
        else:
            stream = container.add_stream("libx264", rate=fps)
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"}
        h, w = frames.shape[1:3]
        if not lossless and (h % 2 or w % 2):
            raise ValueError("yuv420p needs even frame sizes")
        stream.width, stream.height = w, h
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def read_video(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode a video to (T, H, W, 3) uint8 RGB; resize to size x size if given and different.

    Raises ValueError with the file name when the file cannot be decoded.
    """
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            out = []
            for frame in container.decode(video=0):
                if size is not None and (frame.width != size or frame.height != size):
                    frame = frame.reformat(width=size, height=size, format="rgb24")
                out.append(frame.to_ndarray(format="rgb24"))
    except ValueError:
        raise
    except Exception as e:  # PyAV raises its own error classes for every kind of bad file
        raise ValueError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    if not out:
        return np.zeros((0, size or 0, size or 0, 3), np.uint8)
    return np.stack(out)
