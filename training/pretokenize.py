"""Tokenise a dataset once with a frozen tokenizer and latent action model, into one file to train from.

    python -m training.pretokenize --checkpoint RELEASE --data DATA --out data.tokens.safetensors
    python -m training.pretokenize --data DATA --frames-out data.frames.safetensors      # frames, no model
    python -m training.pretokenize --data data.tokens.safetensors --max-frames 200000 --out small.safetensors
    python -m training.train --config ... --data data.tokens.safetensors --stage dynamics --init-from RELEASE ...

The tokens file holds every frame's tokens (uint16), the latent actions inferred for every transition
(uint8), the video boundaries, the videos' rewards and episode ends, and the identity of the release that
made it (see `training.pretokenized`). The dynamics stage trains from it with no tokenizer or latent action
pass per step, and refuses it when the run's tokenizer or latent action model is another one. The frames
file (uint8) is the dataset in one file for any stage, e.g. to copy to a machine with no video decoder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.data import DatasetError, FrameCache
from training.pretokenized import FrameFile, file_kind, write_frames_file, write_subset, write_tokens_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.pretokenize", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", type=Path, required=True,
                   help="dataset folder (DATA/videos/*.mp4), a frames file, or a tokens file to cut (--max-frames)")
    p.add_argument("--checkpoint", default=None,
                   help="release folder (or hub id; default: the shipped model) whose tokenizer and latent "
                        "action model tokenise the data; the dynamics stage must use the same ones")
    p.add_argument("--out", type=Path, default=None, help="tokens file to write (.safetensors)")
    p.add_argument("--frames-out", type=Path, default=None, help="frames file to write (.safetensors)")
    p.add_argument("--image-size", type=int, default=64, help="frame size of a frames file made without --checkpoint")
    p.add_argument("--max-frames", type=int, default=0,
                   help="only the first videos, up to this many frames (0 = all), e.g. to fit a transfer limit")
    p.add_argument("--batch", type=int, default=256, help="frames per forward pass")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the latent action model, as the dynamics stage would run (default: "
                        "the release config's bf16); frames are coded into tokens in float32 either way")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    a = p.parse_args(argv)
    if a.out is None and a.frames_out is None:
        p.error("nothing to write: pass --out FILE (tokens) and/or --frames-out FILE (frames)")
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    try:
        kind = file_kind(a.data)
        model = None
        if a.out is not None and kind != "tokens":
            from genie_env import Genie

            model = Genie.from_pretrained(a.checkpoint, device=device)
        size = model.config.image_size if model is not None else a.image_size
        if kind == "tokens":  # a smaller copy of a file made before
            if a.max_frames <= 0 or a.out is None or a.frames_out is not None or a.checkpoint is not None:
                p.error("--data FILE takes only --max-frames N and --out SMALLER_FILE (its first videos, "
                        "up to N frames)")
            write_subset(a.data, a.out, a.max_frames)
            print(f"wrote {a.out}: {a.out.stat().st_size / 1e6:.1f} MB")
            return 0
        # a frames file serves as the dataset where no video decoder is installed
        cache = FrameFile(a.data) if kind == "frames" else FrameCache(a.data, size)
        if a.max_frames:
            keep = np.cumsum([e.frames for e in cache.videos]) <= a.max_frames
            if not keep.any():
                p.error(f"--max-frames {a.max_frames} is shorter than the first video ({cache.videos[0].frames})")
            cache.videos = [e for e, k in zip(cache.videos, keep) if k]
        if a.frames_out is not None:
            t0 = time.time()
            write_frames_file(cache, a.frames_out)
            print(f"wrote {a.frames_out}: {cache.total_frames} frames, "
                  f"{a.frames_out.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f} s")
        if model is not None:
            t0 = time.time()
            from genie_env.hub import default_weights_dir

            source = a.checkpoint or default_weights_dir()
            write_tokens_file(model, cache, a.out, source=str(source), batch=a.batch, bf16=a.bf16)
            print(f"wrote {a.out}: {cache.total_frames} frames, {a.out.stat().st_size / 1e6:.1f} MB "
                  f"in {time.time() - t0:.0f} s on {device}")
    except (DatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
