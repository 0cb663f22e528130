"""Kept for imports from before media I/O moved to `genie_env.media`; import from there."""

from genie_env.media import read_video, write_video

__all__ = ["read_video", "write_video"]
