"""Which clips evaluation takes from a validation set."""

from __future__ import annotations

from training.evaluate import spread_clips


def test_evaluation_clips_are_spread_over_every_video():
    takes = spread_clips([62] * 100, 128)  # 100 videos of 1,000 frames, 16-frame clips
    assert sum(takes) == 128 and min(takes) == 1 and max(takes) == 2
    assert sum(takes[64:]) >= 36 * 128 // 100  # the last videos get their share too
    assert sorted(spread_clips([1, 10, 10], 12)) == [1, 5, 6]  # a short video's share goes to the others
    takes = spread_clips([5] * 52, 32)  # fewer clips than videos: evenly spaced ones
    assert sum(takes) == 32 and max(takes) == 1 and takes[:26].count(1) in (16, 15, 17)
    assert spread_clips([2, 2], 10) == [2, 2]  # no more than the videos hold
