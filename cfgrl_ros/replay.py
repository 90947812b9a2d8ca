"""Open-loop replay sources and the action comparison, without ROS (the replay node plays them).

A replay is a list of `ReplayFrame`s: the camera image, when to show it, the action recorded with it
(if any) and, on the first frame of each goal, the goal to latch before it. Sources:
- an OGBench-format dataset (.npz): episodes in order; each episode's goal is its final state (the
  last observation as the goal image; oracle_reps, or the oracle vector computed from qpos, as the
  goal vector); frames at a fixed rate (the env's 20 Hz control rate by default); recorded action =
  the dataset action.
- a rosbag2 mcap bag: camera frames at their record times; goal messages are attached to the next
  frame (the first goal to the first frame: goals are latched, a recorder may see one a little late);
  PolicyAction messages are matched to frames by image_stamp (the first action per frame).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from cfgrl_ros import bags
from cfgrl_ros.image import ImageError, message_to_rgb

DATASET_HZ = 20.0  # OGBench manipulation control period 0.05 s
ACTION_WINDOW_S = 5.0  # how long after the last frame kept a bag is still read for that frame's action


class ReplayError(ValueError):
    """A replay source that cannot be played: empty, or missing what was asked for."""


@dataclasses.dataclass(frozen=True)
class ReplayFrame:
    time_s: float  # playback time relative to the first frame, at the recorded rate
    image: np.ndarray  # (H, W, 3) uint8
    recorded_action: np.ndarray | None = None
    goal_image: np.ndarray | None = None  # set on frames where a new goal must be latched first
    goal_vector: np.ndarray | None = None

    @property
    def sets_goal(self) -> bool:
        return self.goal_image is not None or self.goal_vector is not None


def dataset_frames(path: str | os.PathLike, *, env_name: str | None = None, episodes: list[int] | None = None,
                   max_frames: int | None = None, hz: float = DATASET_HZ,
                   cache_dir: str | os.PathLike | None = None) -> list[ReplayFrame]:
    """Frames of the chosen episodes (all by default) of an OGBench-format dataset."""
    from training.data import load_dataset  # the one loader of OGBench files (memmapped observations)

    _check_max_frames(max_frames)
    if not (math.isfinite(hz) and hz > 0):
        raise ReplayError(f"the dataset's rate must be a positive number of Hz, got {hz}")
    dataset = load_dataset(path, env_name=env_name, cache_dir=cache_dir)
    ends = np.flatnonzero(dataset.valids == 0)  # each episode's last row
    starts = np.concatenate([[0], ends[:-1] + 1])
    chosen = range(len(ends)) if episodes is None else episodes
    missing = [e for e in chosen if not 0 <= e < len(ends)]
    if missing:  # all of them, before any frame is read, so max_frames cannot hide one
        raise ReplayError(f"{path} has {len(ends)} episodes (0-{len(ends) - 1}); episodes {missing} do not exist")
    frames: list[ReplayFrame] = []
    for episode in chosen:
        goal_vector = _episode_goal_vector(dataset, ends[episode])
        for row in range(starts[episode], ends[episode] + 1):
            first = row == starts[episode]
            frames.append(ReplayFrame(
                time_s=len(frames) / hz, image=np.asarray(dataset.observations[row]),
                recorded_action=dataset.actions[row].copy(),
                goal_image=np.asarray(dataset.observations[ends[episode]]) if first else None,
                goal_vector=goal_vector if first else None))
            if max_frames is not None and len(frames) >= max_frames:
                return frames
    if not frames:
        raise ReplayError(f"{path}: no frames to replay")
    return frames


def _episode_goal_vector(dataset, end: int) -> np.ndarray | None:
    if dataset.oracle_reps is not None:
        return dataset.oracle_reps[end].copy()
    if dataset.env_name is None or dataset.qpos is None:
        return None  # image goals only
    from training.oracle_goals import oracle_goals

    buttons = None if dataset.button_states is None else dataset.button_states[end : end + 1]
    return oracle_goals(dataset.env_name, dataset.qpos[end : end + 1], buttons)[0]


def bag_frames(path: str | os.PathLike, *, camera_topic: str = "camera/image", goal_image_topic: str = "goal/image",
               goal_vector_topic: str = "goal/vector", action_topic: str = "action",
               max_frames: int | None = None) -> list[ReplayFrame]:
    """Frames of a rosbag2 bag, with goals and the recorded actions matched to them.

    An action belongs to the frame whose stamp is its image_stamp; where that stamp names no single
    frame (a camera that stamps 0, or repeats a stamp), to the newest frame received before it.
    Reading stops ACTION_WINDOW_S after the last frame kept, so max_frames bounds the memory too.
    """
    _check_max_frames(max_frames)
    camera_topic, goal_image_topic, goal_vector_topic, action_topic = tuple(
        bags.same_topic(t) for t in (camera_topic, goal_image_topic, goal_vector_topic, action_topic))
    recorded_types = {bags.same_topic(topic): msgtype for topic, (msgtype, _) in bags.bag_topics(path).items()}
    camera_type = recorded_types.get(camera_topic, bags.IMAGE_TYPE)  # raw, or a robot's compressed stream
    if camera_type not in bags.CAMERA_TYPES:
        raise ReplayError(f"{path}: {camera_topic} holds {camera_type}; the camera must be one of "
                          f"{', '.join(bags.CAMERA_TYPES)}")
    expected_types = {camera_topic: camera_type, goal_image_topic: bags.IMAGE_TYPE,
                      goal_vector_topic: bags.VECTOR_TYPE, action_topic: bags.POLICY_ACTION_TYPE}
    images, times, stamps, goals_before = [], [], [], []
    pending_goal: dict[str, np.ndarray] = {}
    actions: list[tuple[int, int, np.ndarray]] = []  # (received ns, image_stamp ns, action)
    for item in bags.read_bag(path, expected_types):
        topic = bags.same_topic(item.topic)
        if max_frames is not None and len(images) == max_frames:
            if item.timestamp_ns > times[-1] + ACTION_WINDOW_S * 1e9 and any(goals_before):
                break  # read on without a goal yet: a latched goal may be recorded after the first frames
            if topic == camera_topic:
                continue  # past max_frames: never decoded
        if topic == camera_topic:
            image = _decoded(item, path, len(images))
            stamp = bags.stamp_ns(item.message.header.stamp)
            # The same frame shown again (a lockstep resend, same stamp and pixels): one frame, one action.
            if any(stamps[i] == stamp and np.array_equal(images[i], image)
                   for i in range(max(0, len(stamps) - 3), len(stamps))):
                continue
            images.append(image)
            times.append(item.timestamp_ns)
            stamps.append(stamp)
            goals_before.append(pending_goal)
            pending_goal = {}
        elif topic == goal_image_topic:
            pending_goal = {**pending_goal, "goal_image": _decoded(item, path, len(images))}
        elif topic == goal_vector_topic:
            pending_goal = {**pending_goal, "goal_vector": np.asarray(item.message.data, dtype=np.float32).copy()}
        elif item.message.inference_time_ms > 0:  # computed, not a stale-input stop (the replay drops those too)
            actions.append((item.timestamp_ns, bags.stamp_ns(item.message.image_stamp),
                            np.asarray(item.message.action, dtype=np.float32).copy()))
    if not images:
        raise ReplayError(f"{path} has no messages on {camera_topic} (topics: {sorted(bags.bag_topics(path))})")
    if max_frames is not None and not any(goals_before) and pending_goal:
        goals_before[0] = pending_goal  # the goal came after the last frame kept
    first_goal = next((i for i, goal in enumerate(goals_before) if goal), None)
    if first_goal is None:  # the node would act on whatever goal it held from before
        raise ReplayError(f"{path} has no goal on {goal_image_topic} or {goal_vector_topic} for its "
                          f"{len(images)} frames")
    if first_goal:  # goals are latched: one recorded just after the first frames held for them too
        goals_before[0], goals_before[first_goal] = goals_before[first_goal], {}
    recorded = _recorded_actions(actions, times, stamps)
    return [ReplayFrame(time_s=(t - times[0]) * 1e-9, image=image, recorded_action=action, **goal)
            for image, t, action, goal in zip(images, times, recorded, goals_before)]


def _recorded_actions(actions: list[tuple[int, int, np.ndarray]], times: list[int],
                      stamps: list[int]) -> list[np.ndarray | None]:
    """The first computed action of each frame (see bag_frames for which frame an action belongs to)."""
    counts = collections.Counter(stamps)
    frame_of_stamp = {stamp: i for i, stamp in enumerate(stamps) if stamp and counts[stamp] == 1}
    recorded: list[np.ndarray | None] = [None] * len(times)
    for received_ns, image_stamp_ns, action in actions:
        if image_stamp_ns in frame_of_stamp:
            index = frame_of_stamp[image_stamp_ns]
        elif image_stamp_ns == 0 or counts[image_stamp_ns] > 1:  # a stamp that names no single frame
            index = bisect.bisect_right(times, received_ns) - 1
        else:
            continue  # the action of a frame not kept (past max_frames), or of no frame here
        if index >= 0 and recorded[index] is None:
            recorded[index] = action
    return recorded


def _decoded(item: "bags.BagMessage", path, frame: int) -> np.ndarray:
    try:
        return message_to_rgb(item.message).copy()
    except ImageError as error:
        raise ReplayError(f"{path}: {item.topic} message at frame {frame}: {error}") from error


def _check_max_frames(max_frames: int | None) -> None:
    if max_frames is not None and max_frames < 1:
        raise ReplayError(f"max_frames must be >= 1 (or None for all), got {max_frames}")


def compare_actions(recorded: np.ndarray, replayed: np.ndarray) -> dict:
    """Error statistics of replayed vs recorded actions, both (N, A) over the same frames."""
    recorded, replayed = np.asarray(recorded, np.float64), np.asarray(replayed, np.float64)
    if recorded.shape != replayed.shape or recorded.ndim != 2 or len(recorded) == 0:
        raise ReplayError(f"need two equal (N, A) arrays with N > 0, got {recorded.shape} and {replayed.shape}")
    error = replayed - recorded
    norms = np.linalg.norm(recorded, axis=1) * np.linalg.norm(replayed, axis=1)
    nonzero = norms > 0
    cosine = (recorded * replayed).sum(axis=1)[nonzero] / norms[nonzero]
    return {
        "frames_compared": len(recorded),
        "mse": float(np.mean(error**2)),
        "mse_per_dim": np.mean(error**2, axis=0).tolist(),
        "mae_per_dim": np.mean(np.abs(error), axis=0).tolist(),
        "max_abs_error": float(np.max(np.abs(error))),
        "cosine_mean": float(cosine.mean()) if cosine.size else math.nan,
        "cosine_frames": int(cosine.size),
    }


def write_replay_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """replay_report.json (everything) and replay_report.md (a table); returns the markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "replay_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    comparison = report.get("comparison") or {}
    played, answered = report.get("frames_played", 0), report.get("frames_with_action", 0)
    lines = [f"# Replay of {report.get('source', '?')}", "",
             f"- frames played: {played} (rate {report.get('rate', '?')}, {report.get('resends', 0)} resent)",
             f"- frames the policy answered: {answered}; unanswered: {played - answered}",
             f"- frames with a recorded action to compare with: {report.get('frames_with_recorded_action', 0)}",
             f"- compared (answered and recorded): {comparison.get('frames_compared', 0)}", ""]
    if comparison:
        dims = len(comparison["mse_per_dim"])
        lines += ["| metric | all | " + " | ".join(f"dim {i}" for i in range(dims)) + " |",
                  "|---|---|" + "---|" * dims,
                  f"| MSE | {comparison['mse']:.6g} | " + " | ".join(f"{v:.6g}" for v in comparison["mse_per_dim"]) + " |",
                  "| MAE | | " + " | ".join(f"{v:.6g}" for v in comparison["mae_per_dim"]) + " |",
                  f"| cosine (mean) | {comparison['cosine_mean']:.6f} |" + " |" * dims,
                  f"| max abs error | {comparison['max_abs_error']:.6g} |" + " |" * dims]
    else:
        lines.append("no frame has both a recorded and a replayed action: nothing to compare")
    path = out_dir / "replay_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
