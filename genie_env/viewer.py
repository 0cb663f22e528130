"""genie-play: play a Genie world model with the keyboard in a pygame window.

    genie-play                                  # the shipped model
    genie-play --checkpoint runs/x/release --record session.mp4
    genie-play --headless --steps 120           # no window: auto-play, save a clip and a screenshot
    genie-play --prompt start.png               # start from an image instead of the prompt bank

Arrow keys or WASD move (left, right, up = jump; two keys held give LEFT+UP / RIGHT+UP), no key is the
NONE action; number keys 1-9 pick latent actions 0-8 directly. R restarts from a new prompt, Space
pauses, Esc or Q quits.

Three layers, so that tests can drive it with posted key events under SDL_VIDEODRIVER=dummy: the keymap
as data, a pure key handler (it tracks KEYDOWN/KEYUP itself: pygame.key.get_pressed() does not see
posted events), and a thin loop around `GenieEnv`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from genie_env.keys import COMMAND_KEYS, DIRECTION_KEYS, HORIZONTAL, NONE, NUMBER_KEYS, VERTICAL, keys_to_action
from genie_env.media import VideoWriter, load_image, save_png, save_video

__all__ = ["KeyHandler", "PlayArgs", "VideoWriter", "Viewer", "keys_to_action", "main", "save_video"]


# ---------------------------------------------------------------------------------------- key handler
class KeyHandler:
    """Which keys are held and what they mean; pure (key names in, latent actions out).

    The most recently pressed key of each axis wins (holding LEFT then pressing RIGHT goes right), and
    a held number key pressed after the direction keys overrides them.
    """

    def __init__(self, action_map: dict[str, int], num_actions: int) -> None:
        self.action_map = dict(action_map)
        self.num_actions = num_actions
        self.held: list[str] = []
        """Held direction and number keys, oldest first."""
        self.paused = False
        self.quit = False
        self.restart = False
        """Set by R; the loop clears it once it has restarted."""

    def key_down(self, key: str) -> None:
        command = COMMAND_KEYS.get(key)
        if command == "quit":
            self.quit = True
        elif command == "restart":
            self.restart = True
        elif command == "pause":
            self.paused = not self.paused
        elif key in DIRECTION_KEYS or (key in NUMBER_KEYS and NUMBER_KEYS[key] < self.num_actions):
            if key in self.held:
                self.held.remove(key)
            self.held.append(key)

    def key_up(self, key: str) -> None:
        if key in self.held:
            self.held.remove(key)

    def action(self) -> tuple[int, str] | None:
        """(latent action, label) for the held keys; None when no key that means an action is held."""
        if self.held and self.held[-1] in NUMBER_KEYS:
            return NUMBER_KEYS[self.held[-1]], f"latent {NUMBER_KEYS[self.held[-1]]}"
        dirs = [DIRECTION_KEYS[k] for k in self.held if k in DIRECTION_KEYS]
        h = next((d for d in reversed(dirs) if d in HORIZONTAL), None)
        v = next((d for d in reversed(dirs) if d in VERTICAL), None)
        for name in (f"{h}+{v}" if h and v else None, h, v):
            if name and name in self.action_map:
                return self.action_map[name], f"{name} ({self.action_map[name]})"
        numbers = [k for k in self.held if k in NUMBER_KEYS]
        if numbers:
            return NUMBER_KEYS[numbers[-1]], f"latent {NUMBER_KEYS[numbers[-1]]}"
        return None

    def idle_action(self) -> tuple[int, str]:
        """The action when no key is held: the map's NONE, else latent action 0."""
        a = self.action_map.get(NONE, 0)
        return a, f"{NONE} ({a})"


class AutoPilot:
    """Headless play: holds a random action for 4 to 12 frames, like a person tapping keys."""

    def __init__(self, choices: Sequence[int], rng: np.random.Generator) -> None:
        self.choices = list(choices)
        self.rng = rng
        self._action, self._left = self.choices[0], 0

    def __call__(self) -> int:
        if self._left <= 0:
            self._action = int(self.rng.choice(self.choices))
            self._left = int(self.rng.integers(4, 13))
        self._left -= 1
        return self._action


# ---------------------------------------------------------------------------------------- speed notice
SLOW_AFTER_STEPS = 6
"""Model steps timed (after the first, which warms up) before judging whether it keeps up."""


def slow_message(model_fps: float, display_fps: int, dtype: str, native_bf16: bool, maskgit_steps: int
                 ) -> str | None:
    """What to tell a player once when the model steps slower than the display rate (None when it keeps
    up within 10%): how fast it runs and the one setting to try first."""
    if model_fps >= 0.9 * display_fps:
        return None
    if dtype == "bf16" and not native_bf16:
        tip = "--dtype fp32 (this device has no native bf16, so bf16 is emulated and slow)"
    elif maskgit_steps > 1:
        tip = "--maskgit-steps 1 (about 1.5x faster; frames drift from the game sooner)"
    else:
        tip = f"--fps {max(1, int(model_fps))} (the rate this machine sustains)"
    return (f"genie-play: the model runs at {model_fps:.1f} frames/s on this machine, slower than the "
            f"{display_fps} frames/s display rate; to speed it up try {tip}")


# ---------------------------------------------------------------------------------------- the loop
class Viewer:
    """A `GenieEnv` in a pygame window: `tick()` handles events, steps once (unless paused) and draws.

    With ``autopilot`` set, frames without a held key use its actions instead of NONE (headless play).
    """

    BAR = 22  # pixels of status line under the frame

    def __init__(self, env: Any, scale: int = 8, fps: int = 15, seed: int | None = None,
                 autopilot: AutoPilot | None = None, writer: VideoWriter | None = None,
                 prompt: np.ndarray | None = None) -> None:
        import pygame

        self.pygame = pygame
        self.env, self.scale, self.fps, self.seed = env, scale, fps, seed
        self.options = None if prompt is None else {"prompt": prompt}
        self.autopilot, self.writer = autopilot, writer
        self.keys = KeyHandler(env.action_map, int(env.action_space.n))
        self.names = env.get_action_meanings()
        self._key_names = {getattr(pygame, n): n for n in (*DIRECTION_KEYS, *NUMBER_KEYS, *COMMAND_KEYS)}
        h, w = env.observation_space.shape[:2]
        self.size = (w * scale, h * scale)
        pygame.display.init()
        pygame.display.set_caption("genie-play")
        self.screen = pygame.display.set_mode((self.size[0], self.size[1] + self.BAR))
        try:
            pygame.font.init()
            self.font = pygame.font.Font(None, 20)
        except Exception:  # a pygame built without fonts: the caption still shows the status line
            self.font = None
        self.clock = pygame.time.Clock()
        self.where = runs_on(env)
        """Device and number format, e.g. "cpu (2 threads), fp32"; shown in the window title."""
        self.step_seconds: list[float] = []
        """Wall time of each env.step (the model's own rate, whatever the display waits)."""
        self.slow_notice: str | None = None
        """The one-time message when the model cannot keep up with the display rate."""
        self.actions: list[int] = []
        """Every latent action played, in order."""
        self.score = 0.0
        """Reward collected in the current episode (the model's reward head; 0 without one)."""
        self.episodes_ended = 0
        """Episodes the model ended (its episode-end head): each restarts from a new real frame."""
        self.last_end: str | None = None
        """How the last episode ended, shown on the status line until the next one ends."""
        self.label = NONE
        self.obs, _ = env.reset(seed=seed, options=self.options)
        self._record(self.obs)
        self.draw()

    @property
    def steps(self) -> int:
        return len(self.actions)

    def handle_events(self) -> None:
        pg = self.pygame
        for event in pg.event.get():
            if event.type == pg.QUIT:
                self.keys.quit = True
            elif event.type in (pg.KEYDOWN, pg.KEYUP) and event.key in self._key_names:
                if event.type == pg.KEYDOWN:
                    self.keys.key_down(self._key_names[event.key])
                else:
                    self.keys.key_up(self._key_names[event.key])

    def choose_action(self) -> tuple[int, str]:
        held = self.keys.action()
        if held is not None:
            return held
        if self.autopilot is not None:
            a = self.autopilot()
            return a, f"auto {self.names[a]}"
        return self.keys.idle_action()

    def tick(self) -> bool:
        """One frame of the loop; False once the user has quit."""
        self.handle_events()
        if self.keys.quit:
            return False
        if self.keys.restart:
            self.keys.restart = False
            self.obs, _ = self.env.reset(options=self.options)
            self.score = 0.0
            self._record(self.obs)
        elif not self.keys.paused or self.autopilot is not None:  # pausing a headless run would never end
            action, self.label = self.choose_action()
            t0 = time.perf_counter()
            self.obs, reward, terminated, _, _ = self.env.step(action)
            self.step_seconds.append(time.perf_counter() - t0)
            self._check_speed()
            self.actions.append(action)
            self.score += float(reward)
            self._record(self.obs)
            if terminated:  # the game would end here (coin or death): show it, then start a new episode
                self.episodes_ended += 1
                self.last_end = f"episode over, score {self.score:g}"
                self.draw()
                self.obs, _ = self.env.reset(options=self.options)
                self.score = 0.0
                self._record(self.obs)
        self.draw()
        self.clock.tick(self.fps if self.autopilot is None else 0)
        return True

    def status(self) -> str:
        paused = "  PAUSED" if self.keys.paused and self.autopilot is None else ""
        ended = f"  ({self.last_end})" if self.last_end else ""
        return (f"{self.label}  {self.clock.get_fps():4.1f} fps  step {self.steps}  score {self.score:g}"
                f"{ended}{paused}")

    def model_fps(self) -> float | None:
        """Frames per second the model sustains (median of the steps after the first), None before any."""
        timed = self.step_seconds[1:]
        return 1 / statistics.median(timed) if timed else None

    def _check_speed(self) -> None:
        if self.slow_notice is not None or len(self.step_seconds) != SLOW_AFTER_STEPS + 1:
            return
        model = getattr(getattr(self.env, "unwrapped", self.env), "model", None)
        if model is None:
            return
        from genie_env.precision import DTYPES, native_bf16

        dtype = next(name for name, dt in DTYPES.items() if dt == model.autocast_dtype)
        msg = slow_message(self.model_fps(), self.fps, dtype, native_bf16(model.device),
                           int(getattr(self.env.unwrapped, "maskgit_steps", 1)))
        if msg is not None:
            self.slow_notice = msg
            print(msg, file=sys.stderr)

    def draw(self) -> None:
        pg = self.pygame
        frame = pg.surfarray.make_surface(np.ascontiguousarray(self.obs.transpose(1, 0, 2)))
        self.screen.fill((0, 0, 0))
        self.screen.blit(pg.transform.scale(frame, self.size), (0, 0))
        text = self.status()
        if self.font is not None:
            self.screen.blit(self.font.render(text, True, (230, 230, 230)), (4, self.size[1] + 4))
        pg.display.set_caption(f"genie-play  {text}  |  {self.where}")
        pg.display.flip()

    def screenshot(self) -> np.ndarray:
        """The window as (H, W, 3) uint8."""
        return self.pygame.surfarray.array3d(self.screen).transpose(1, 0, 2).copy()

    def close(self) -> None:
        self.pygame.display.quit()

    def _record(self, obs: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.write(obs)


def runs_on(env: Any) -> str:
    """Where the env's model runs and in what format, e.g. "cpu (2 threads), fp32 (no native bf16 on
    this CPU)"; "" for an env without a Genie model."""
    model = getattr(getattr(env, "unwrapped", env), "model", None)
    if model is None:
        return ""
    from genie_env.precision import DTYPES, describe

    return describe(model.device, next(name for name, dt in DTYPES.items() if dt == model.autocast_dtype))


# ---------------------------------------------------------------------------------------- command line
@dataclass
class PlayArgs:
    """genie-play: play a Genie world model with the keyboard."""

    checkpoint: str | None = field(default=None, metadata={
        "help": "checkpoint folder or hub repo id (default: the shipped model)"})
    seed: int | None = field(default=None, metadata={"help": "seed of prompts and sampling (default: random)"})
    prompt: str | None = field(default=None, metadata={
        "help": "start from this image file (resized to the model's frames) instead of the prompt bank"})
    maskgit_steps: int | None = field(default=None, metadata={
        "help": "MaskGIT steps per frame: fewer is faster (default: the model's)"})
    temperature: float | None = field(default=None, metadata={
        "help": "sampling temperature, 0 = greedy (default: the model's)"})
    no_carry: bool = field(default=False, metadata={
        "help": "decode every patch of every frame afresh instead of carrying unchanged ones over sharp"})
    fps: int = field(default=15, metadata={"help": "frames per second of the window and of recordings"})
    scale: int = field(default=8, metadata={"help": "window (and recording) pixels per frame pixel"})
    record: str | None = field(default=None, metadata={
        "help": "save the session to this .mp4 or .gif, and a screenshot .png next to it"})
    headless: bool = field(default=False, metadata={
        "help": "no window: auto-play --steps frames and save a clip (default genie-play.mp4)"})
    steps: int | None = field(default=None, metadata={
        "help": "stop after this many frames (headless default: 60)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)"})
    dtype: str | None = field(default=None, metadata={
        "help": "bf16 or fp32 inference (default: bf16 where the hardware runs it natively, else fp32)",
        "choices": ["bf16", "fp32"]})


HEADLESS_STEPS = 60
HEADLESS_RECORD = "genie-play.mp4"
_TYPES = {"str | None": str, "int | None": int, "float | None": float, "int": int, "bool": bool}


def parse_args(argv: Sequence[str] | None = None) -> PlayArgs:
    parser = argparse.ArgumentParser(prog="genie-play", description=PlayArgs.__doc__,
                                     epilog="keys: arrows/WASD move (up = jump), 1-9 latent actions, R restart, "
                                            "Space pause, Esc/Q quit")
    for f in dataclasses.fields(PlayArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = _TYPES[f.type]
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"],
                                choices=f.metadata.get("choices"))
    args = PlayArgs(**vars(parser.parse_args(argv)))
    for name in ("fps", "scale", "steps", "maskgit_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.record is not None and Path(args.record).suffix.lower() not in (".mp4", ".gif"):
        parser.error(f"--record must end in .mp4 or .gif, got {args.record!r}")
    return args


def no_display() -> bool:
    """True on Linux/BSD with neither X11 nor Wayland to open a window on (macOS/Windows always have one)."""
    if not sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("SDL_VIDEODRIVER"))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return int(e.code or 0)
    headless = args.headless
    if not headless and no_display():
        print("genie-play: no display (DISPLAY and WAYLAND_DISPLAY are unset): running headless", file=sys.stderr)
        headless = True
    if headless:
        os.environ["SDL_VIDEODRIVER"] = "dummy"
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import pygame  # noqa: F401
    except ImportError:
        print("genie-play needs pygame: pip install 'genie-env[viewer]'", file=sys.stderr)
        return 2

    from genie_env.env import GenieEnv
    from genie_env.hub import CheckpointError

    try:
        env = GenieEnv(args.checkpoint, device=args.device, dtype=args.dtype, maskgit_steps=args.maskgit_steps,
                       temperature=args.temperature, carry=False if args.no_carry else None)
    except (CheckpointError, ValueError, TypeError) as e:
        print(f"genie-play: {e}", file=sys.stderr)
        return 2

    prompt = None
    if args.prompt is not None:
        try:
            prompt = load_image(args.prompt, env.observation_space.shape[0])
        except OSError as e:
            print(f"genie-play: cannot read --prompt {args.prompt!r}: {e}", file=sys.stderr)
            return 2
    elif env.prompt_bank is None:
        print("genie-play: this checkpoint ships no prompt bank (prompts.npz): pass --prompt image.png",
              file=sys.stderr)
        return 2

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    steps = args.steps if args.steps is not None or not headless else HEADLESS_STEPS
    record = args.record if args.record is not None or not headless else HEADLESS_RECORD
    writer = VideoWriter(record, fps=args.fps, scale=args.scale) if record else None
    autopilot = None
    if headless:
        choices = sorted(set(env.action_map.values())) or list(range(int(env.action_space.n)))
        autopilot = AutoPilot(choices, np.random.default_rng(seed))
    else:
        print("genie-play: arrows/WASD move (up = jump), 1-9 latent actions, R restart, Space pause, Esc/Q quit")
    print(f"genie-play: seed {seed}; running on {runs_on(env)}")

    viewer = None
    try:
        viewer = Viewer(env, scale=args.scale, fps=args.fps, seed=seed, autopilot=autopilot, writer=writer,
                        prompt=prompt)
        while (steps is None or viewer.steps < steps) and viewer.tick():
            pass
    except pygame.error as e:
        print(f"genie-play: cannot open a window ({e}); try --headless", file=sys.stderr)
        return 1
    finally:
        saved = writer.close() if writer is not None else None
        if viewer is not None:
            if saved is not None:
                shot = save_png(viewer.screenshot(), saved.with_suffix(".png"))
                print(f"genie-play: saved {viewer.steps} steps to {saved.resolve()} "
                      f"and a screenshot to {shot.resolve()}")
            viewer.close()
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
