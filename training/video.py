"""Reading and writing mp4 with PyAV.

Datasets are written losslessly: H.264 in RGB (libx264rgb, qp 0), so pixel art keeps its colours.
Any mp4 PyAV can decode is read (converted to RGB, resized to the dataset resolution when needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
