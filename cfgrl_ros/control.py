"""What the policy node does at each control tick, decided without ROS.

Times are seconds on the node clock (which follows /clock under use_sim_time); ages are measured
from when an input arrived, not from its header stamp, so an unsynchronised camera clock cannot
make fresh images look stale or stale ones fresh.
"""

from __future__ import annotations

import enum

import numpy as np


class GoalError(ValueError):
    """A goal the policy cannot use (wrong length, NaN or inf)."""


class ActionError(ValueError):
    """An action the policy computed that must not be published (NaN or inf)."""


def checked_action(action: np.ndarray) -> np.ndarray:
    """The action if every value is finite. Clipping keeps NaN as NaN, so it is checked, never sent."""
    if not np.all(np.isfinite(action)):
        raise ActionError(f"the policy computed a non-finite action {np.asarray(action).tolist()}")
    return action


def goal_vector(values, goal_dim: int) -> np.ndarray:
    """Validate an oracle goal vector: exactly goal_dim finite values; returned as float32."""
    vector = np.asarray(values, dtype=np.float32).reshape(-1)
    if vector.size != goal_dim:
        raise GoalError(f"goal vector has {vector.size} values, the policy expects goal_dim = {goal_dim}")
    if not np.all(np.isfinite(vector)):
        raise GoalError(f"goal vector holds NaN or inf: {vector.tolist()}")
    return vector


class Inputs(enum.Enum):
    FRESH = "fresh"
    NO_GOAL = "no goal received yet"
    NO_IMAGE = "no usable camera image yet"
    STALE_IMAGE = "camera image is stale"
    STALE_GOAL = "goal is stale"

    @property
    def stale(self) -> bool:
        """Inputs went old: the stale_action applies."""
        return self in (Inputs.STALE_IMAGE, Inputs.STALE_GOAL)

    @property
    def missing(self) -> bool:
        """No usable input: no action before the node has acted; once it has, the stale_action applies."""
        return self in (Inputs.NO_GOAL, Inputs.NO_IMAGE)


def assess_inputs(now_s: float, image_arrival_s: float | None, goal_arrival_s: float | None,
                  max_image_age_s: float, max_goal_age_s: float) -> Inputs:
    """Classify the inputs at time now_s. max_goal_age_s <= 0 means goals never go stale.

    A negative age (the clock jumped back, e.g. a looping bag under sim time) counts as fresh: the
    input arrived after the jump's reference and the next input resets it anyway.
    """
    if goal_arrival_s is None:
        return Inputs.NO_GOAL
    if image_arrival_s is None:
        return Inputs.NO_IMAGE
    if now_s - image_arrival_s > max_image_age_s:
        return Inputs.STALE_IMAGE
    if max_goal_age_s > 0 and now_s - goal_arrival_s > max_goal_age_s:
        return Inputs.STALE_GOAL
    return Inputs.FRESH


def stale_action(mode: str, last_action: np.ndarray | None, action_dim: int) -> np.ndarray | None:
    """The action to publish while inputs are stale: zeros, the last action again, or nothing.

    `hold` with no action computed yet publishes nothing: there is nothing to hold.
    """
    if mode == "zero":
        return np.zeros(action_dim, dtype=np.float32)
    if mode == "hold":
        return None if last_action is None else last_action
    if mode == "none":
        return None
    raise ValueError(f"unknown stale_action {mode!r}; expected zero, hold or none")
