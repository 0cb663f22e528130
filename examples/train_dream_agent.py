"""Train an agent inside Genie-v0 only, then play it on the real game: how the shipped agent was made.

    python examples/train_dream_agent.py --out runs/dream-agent --prompts data/coinrun-hold-train
    python examples/train_dream_agent.py --out runs/dream-agent --plot-only     # the learning curve again

1. PPO in the dream (`python -m training.train_agent`): every step is the world model's, and so are the
   reward and the episode's end (the checkpoint's reward and termination heads). Episodes start from real
   frames of the training levels and are cut after 100 steps.
2. The learning curve inside the dream is drawn to OUT/learning_curve.png (mean return of the episodes that
   ended, and reward events per 1,000 steps, against env steps).
3. The agent plays the real game (`python -m training.evaluate_agent`) on levels no part of the model saw,
   next to a uniformly random policy on the same levels.

Recording the prompts dataset needs the `record` extra (procgen): see the README's "Train your own".
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
from pathlib import Path


def plot_curve(metrics_csv: Path, out_png: Path, window: int = 10) -> None:
    """Panels against env steps (dream return of the episodes that ended, reward events per 1,000 dream
    steps, policy entropy): each update in grey, its moving average over ``window`` updates in blue. Drawn
    with Pillow, so that no plotting library is needed."""
    from PIL import Image, ImageDraw

    rows = list(csv.DictReader(open(metrics_csv)))
    steps = [float(r["step"]) for r in rows]
    panels = [("dream return (finished episodes)", [float(r["mean_return"]) for r in rows]),
              ("reward events per 1,000 dream steps", [float(r["rewards_per_1000"]) for r in rows]),
              ("policy entropy (nats)", [float(r["entropy"]) for r in rows])]
    w, h, pad = 640, 200, 40
    img = Image.new("RGB", (w, h * len(panels)), "white")
    d = ImageDraw.Draw(img)
    for k, (title, ys) in enumerate(panels):
        top = k * h
        good = [(x, y) for x, y in zip(steps, ys) if not math.isnan(y)]
        d.text((pad, top + 5), f"{title}; blue: mean of {window} updates", fill="black")
        d.rectangle([pad, top + 20, w - 10, top + h - pad + 10], outline="black")
        if len(good) < 2:
            continue
        x0, x1 = min(steps), max(steps)
        y0, y1 = min(y for _, y in good), max(y for _, y in good)
        y1 = y1 if y1 > y0 else y0 + 1
        avg = []
        for i in range(len(good)):
            part = good[max(0, i - window + 1): i + 1]
            avg.append((good[i][0], sum(y for _, y in part) / len(part)))
        for series, colour, width in ((good, (170, 170, 170), 1), (avg, (20, 40, 160), 3)):
            pts = [(pad + (x - x0) / max(1e-9, x1 - x0) * (w - 10 - pad),
                    top + h - pad + 10 - (y - y0) / (y1 - y0) * (h - pad - 30)) for x, y in series]
            d.line(pts, fill=colour, width=width)
        d.text((pad, top + h - pad + 14), f"{x0:.0f}", fill="black")
        d.text((w - 90, top + h - pad + 14), f"{x1:.0f} steps", fill="black")
        d.text((2, top + 20), f"{y1:.2f}", fill="black")
        d.text((2, top + h - pad), f"{y0:.2f}", fill="black")
    img.save(out_png)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--prompts", default=None, help="recorded dataset of the training levels (start frames)")
    p.add_argument("--checkpoint", default=None, help="world model with reward heads (default: the shipped one)")
    p.add_argument("--steps", type=int, default=150_000, help="dream steps to train for (the shipped agent: 150,528)")
    p.add_argument("--eval-levels", type=int, default=200, help="real levels to play afterwards (0: skip)")
    p.add_argument("--plot-only", action="store_true", help="only draw the learning curve of --out")
    a = p.parse_args()
    if not a.plot_only:
        cmd = [sys.executable, "-m", "training.train_agent", "--out", str(a.out), "--steps", str(a.steps),
               "--num-envs", "32", "--rollout", "32", "--episode-steps", "100"]
        cmd += ["--prompts", a.prompts] if a.prompts else []
        cmd += ["--checkpoint", a.checkpoint] if a.checkpoint else []
        cmd += ["--resume"] if (a.out / "checkpoint.pt").is_file() else []
        subprocess.run(cmd, check=True)
    plot_curve(a.out / "metrics.csv", a.out / "learning_curve.png")
    print(f"learning curve: {a.out / 'learning_curve.png'}")
    if not a.plot_only and a.eval_levels:
        subprocess.run([sys.executable, "-m", "training.evaluate_agent", "--agent", str(a.out), "--start-level",
                        "2000000", "--num-levels", str(a.eval_levels), "--json", str(a.out / "real_game.json")],
                       check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
