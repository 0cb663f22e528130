"""The key map, shared by the viewer (`genie_env.viewer`) and the environment's `get_keys_to_action`
(for `gymnasium.utils.play.play`): arrow keys or WASD as direction groups of a checkpoint's action map,
number keys 1-9 as latent actions 0-8.
"""

from __future__ import annotations

import itertools

__all__ = ["COMMAND_KEYS", "DIRECTION_KEYS", "NONE", "NUMBER_KEYS", "keys_to_action"]

# Keys by their pygame constant name, so this module imports without pygame.
DIRECTION_KEYS: dict[str, str] = {
    "K_LEFT": "LEFT", "K_a": "LEFT",
    "K_RIGHT": "RIGHT", "K_d": "RIGHT",
    "K_UP": "UP", "K_w": "UP",
    "K_DOWN": "DOWN", "K_s": "DOWN",
}
NUMBER_KEYS: dict[str, int] = {f"K_{i}": i - 1 for i in range(1, 10)}  # key "1" = latent action 0
COMMAND_KEYS: dict[str, str] = {"K_r": "restart", "K_SPACE": "pause", "K_ESCAPE": "quit", "K_q": "quit"}
HORIZONTAL, VERTICAL = ("LEFT", "RIGHT"), ("UP", "DOWN")
NONE = "NONE"



def keys_to_action(action_map: dict[str, int], num_actions: int) -> dict[tuple[int, ...], int]:
    """pygame key-code tuples -> latent actions, for `gymnasium.utils.play.play`: every arrow / WASD
    combination of the action map's groups (e.g. LEFT+UP as (K_LEFT, K_UP), (K_a, K_w), ...), and the
    number keys 1-9 as latent actions 0-8."""
    import pygame

    by_dir: dict[str, list[int]] = {}
    for name, d in DIRECTION_KEYS.items():
        by_dir.setdefault(d, []).append(getattr(pygame, name))
    out: dict[tuple[int, ...], int] = {}
    for group, action in action_map.items():
        parts = group.split("+")
        if group == NONE or not all(p in by_dir for p in parts):
            continue
        for combo in itertools.product(*(by_dir[p] for p in parts)):
            out[tuple(sorted(combo))] = action
    for name, action in NUMBER_KEYS.items():
        if action < num_actions:
            out[(getattr(pygame, name),)] = action
    return out
