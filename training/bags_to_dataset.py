"""Turn rosbag2 recordings of a robot into an OGBench-format dataset (`cfgrl-bags-to-dataset`).

    cfgrl-bags-to-dataset demo_bags/* --out data/robot-v0.npz          # then: cfgrl-train --goal-mode image

Each row is one recorded action and the camera frame it was chosen on:
- cfgrl_ros/msg/PolicyAction (what cfgrl_recorder records): the frame whose header stamp is the
  action's image_stamp (an image_stamp of 0, from a camera that leaves its stamps unset, is paired
  like a command below). Stale-input stops (inference_time_ms == 0) are not demonstrations: they end
  the episode and are left out.
- sensor_msgs/msg/Joy (its axes) or std_msgs/msg/Float32MultiArray (e.g. a teleoperation command):
  the newest frame at or before the action, if it is at most --max-image-age-s older; otherwise the
  episode ends there. Joy messages and frames that both carry header stamps are paired by those
  (the times they were made); otherwise by the times the recorder received them, which a delivery
  delay can reorder.

Every bag starts a new episode, and so does a pause of more than --episode-gap-s between actions.
Frames are decoded and resized exactly as the policy node does (cfgrl_ros/image.py), so training sees
what the robot's node will. The last --val-fraction of the episodes (at least one) form `<name>-val.npz`.
Bags hold no simulator state, hence no oracle goals: train with `--goal-mode image`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cfgrl_ros import bags
from cfgrl_ros.image import ImageError, fit_to_policy, message_to_rgb
from training.data import DatasetError, load_dataset_pair, val_path_for
from training.dataset_files import write_shard

# The field holding the action vector, per accepted message type.
ACTION_FIELDS = {bags.POLICY_ACTION_TYPE: "action", bags.VECTOR_TYPE: "data", bags.JOY_TYPE: "axes"}
ACTION_TYPES = tuple(ACTION_FIELDS)


class ImportBagError(ValueError):
    """A bag that cannot become training data; the message names the bag and the problem."""


@dataclasses.dataclass(frozen=True)
class ImportSettings:
    camera_topic: str = "camera/image"
    action_topic: str = "action"
    image_size: int = 64
    episode_gap_s: float = 1.0
    max_image_age_s: float = 0.5
    min_episode_length: int = 2  # an episode's last row has no next state: two rows give one sample
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        problems = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, rule, ok in (
            ("image_size", ">= 8", self.image_size >= 8),
            ("episode_gap_s", "finite and > 0", math.isfinite(self.episode_gap_s) and self.episode_gap_s > 0),
            ("max_image_age_s", "finite and > 0", math.isfinite(self.max_image_age_s) and self.max_image_age_s > 0),
            ("min_episode_length", ">= 2", self.min_episode_length >= 2),
            ("val_fraction", "within (0, 1)", 0 < self.val_fraction < 1),
        ) if not ok]
        if problems:
            raise ImportBagError("; ".join(problems))


@dataclasses.dataclass
class Counts:
    """What was kept and what was left out, for the summary and the record."""

    actions_read: int = 0
    stale_stops: int = 0  # PolicyAction stops on stale inputs
    without_frame: int = 0  # no (fresh) frame to pair with
    short_episode_rows: int = 0  # rows of episodes under min_episode_length
    short_episodes: int = 0


@dataclasses.dataclass(frozen=True)
class Command:
    """One recorded action message, reduced to what pairing needs."""

    received_ns: int
    stamp_ns: int  # its header stamp; 0 when it has none (Float32MultiArray) or it is unset
    image_stamp_ns: int | None  # PolicyAction: the frame it was computed from
    stale_stop: bool  # PolicyAction sent on stale inputs, not computed
    values: np.ndarray


def bag_episodes(path: Path, settings: ImportSettings, counts: Counts) -> list[tuple[np.ndarray, np.ndarray]]:
    """(observations (T, S, S, 3) uint8, actions (T, A) float32) per episode of one bag."""
    frames, frame_received, frame_stamps, commands = read_bag_topics(path, settings)
    clocks = {}  # clock -> (frame indices in time order, their times)
    for clock, times in (("received", frame_received), ("stamp", frame_stamps)):
        order = np.argsort(np.asarray(times, dtype=np.int64), kind="stable")
        clocks[clock] = (order, np.asarray(times, dtype=np.int64)[order])
    frame_of_image_stamp = {stamp: i for i, stamp in enumerate(frame_stamps)}
    stamped_frames = bool(frames) and min(frame_stamps) > 0

    def newest_fresh(clock: str, t: int) -> int | None:
        """The newest frame at or before t on that clock, if at most max_image_age_s older."""
        order, times = clocks[clock]
        position = int(np.searchsorted(times, t, side="right")) - 1
        if position < 0 or (t - int(times[position])) * 1e-9 > settings.max_image_age_s:
            return None
        return int(order[position])

    episodes, rows, last_ns = [], [], None

    def end_episode() -> None:
        nonlocal rows
        if len(rows) >= settings.min_episode_length:
            episodes.append(rows)
        elif rows:
            counts.short_episodes += 1
            counts.short_episode_rows += len(rows)
        rows = []

    for command in commands:
        counts.actions_read += 1
        if last_ns is not None and (command.received_ns - last_ns) * 1e-9 > settings.episode_gap_s:
            end_episode()
        last_ns = command.received_ns
        if command.stale_stop:
            counts.stale_stops += 1
            end_episode()
            continue
        if command.image_stamp_ns:  # an unset image_stamp (a camera that leaves stamps 0) names no frame
            frame = frame_of_image_stamp.get(command.image_stamp_ns)
        elif command.stamp_ns > 0 and stamped_frames:  # both stamped at the source: immune to delivery order
            frame = newest_fresh("stamp", command.stamp_ns)
        else:
            frame = newest_fresh("received", command.received_ns)
        if frame is None:
            counts.without_frame += 1
            end_episode()
            continue
        rows.append((frame, command.values))
    end_episode()
    return [(np.stack([frames[f] for f, _ in episode]), np.stack([a for _, a in episode])) for episode in episodes]


def read_bag_topics(path: Path, settings: ImportSettings) -> tuple[list[np.ndarray], list[int], list[int], list[Command]]:
    """(resized frames, their receive times, their header stamps, the commands) of one bag, in record order."""
    camera, action_topic = bags.same_topic(settings.camera_topic), bags.same_topic(settings.action_topic)
    topics = {bags.same_topic(name): msgtype for name, (msgtype, _) in bags.bag_topics(path).items()}
    for topic, what in ((camera, "camera"), (action_topic, "action")):
        if topic not in topics:
            raise ImportBagError(f"{path}: no {what} topic {topic!r} (topics: {sorted(topics)})")
    if topics[camera] not in bags.CAMERA_TYPES:
        raise ImportBagError(f"{path}: {camera} holds {topics[camera]}; the camera must be one of "
                             f"{', '.join(bags.CAMERA_TYPES)}")
    if topics[action_topic] not in ACTION_TYPES:
        raise ImportBagError(f"{path}: {action_topic} holds {topics[action_topic]}; actions must be one of "
                             f"{', '.join(ACTION_TYPES)}")
    frames, received, stamps, commands = [], [], [], []
    for item in bags.read_bag(path, {camera: topics[camera], action_topic: topics[action_topic]}):
        message = item.message
        if bags.same_topic(item.topic) == camera:
            try:
                frames.append(fit_to_policy(message_to_rgb(message), settings.image_size))
            except ImageError as error:
                raise ImportBagError(f"{path}: camera frame {len(frames)} at t={item.timestamp_ns} ns: {error}") from None
            received.append(item.timestamp_ns)
            stamps.append(bags.stamp_ns(message.header.stamp))
            continue
        policy_action = item.msgtype == bags.POLICY_ACTION_TYPE
        values = getattr(message, ACTION_FIELDS[item.msgtype])
        commands.append(Command(
            received_ns=item.timestamp_ns,
            stamp_ns=bags.stamp_ns(message.header.stamp) if hasattr(message, "header") else 0,
            image_stamp_ns=bags.stamp_ns(message.image_stamp) if policy_action else None,
            stale_stop=policy_action and message.inference_time_ms <= 0,
            values=_checked_action(values, path, item.timestamp_ns)))
    return frames, received, stamps, commands


def _checked_action(values, path: Path, timestamp_ns: int) -> np.ndarray:
    """The policy samples actions in [-1, 1]: data outside it would be learned but never output."""
    action = np.asarray(values, dtype=np.float32).copy()
    if action.ndim != 1 or action.size == 0 or not np.isfinite(action).all() or np.abs(action).max() > 1 + 1e-6:
        raise ImportBagError(f"{path}: action at t={timestamp_ns} ns is {action.tolist()}; actions must be finite, "
                             "non-empty and within [-1, 1] (scale them to the robot's limits in the robot's "
                             "adapter, docs/robot.md)")
    return np.clip(action, -1, 1)


def write_split(path: Path, episodes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """OGBench's compact layout: observations, actions, terminals (true on each episode's last row)."""
    terminals = np.concatenate([np.arange(len(actions)) == len(actions) - 1 for _, actions in episodes])
    write_shard(path, dict(observations=np.concatenate([obs for obs, _ in episodes]),
                           actions=np.concatenate([actions for _, actions in episodes]), terminals=terminals))


def import_bags(bag_paths: list[Path], out: Path, settings: ImportSettings = ImportSettings(),
                overwrite: bool = False) -> dict:
    """Write `out` and its `-val.npz` from the bags; returns the record (also written as `<name>.json`)."""
    val_out, record_path = val_path_for(out), out.with_suffix(".json")
    existing = [p for p in (out, val_out) if p.exists()]
    if existing and not overwrite:
        raise ImportBagError(f"{', '.join(map(str, existing))} exists; pass --overwrite to replace it")
    counts, episodes, per_bag = Counts(), [], {}
    for path in tqdm(bag_paths, desc="bags", unit="bag"):
        try:
            found = bag_episodes(path, settings, counts)
        except bags.BagError as error:
            raise ImportBagError(str(error)) from None
        per_bag[str(path)] = len(found)
        episodes += found
    dims = {actions.shape[1] for _, actions in episodes}
    if len(dims) > 1:
        raise ImportBagError(f"the bags hold actions of different lengths {sorted(dims)}")
    if len(episodes) < 2:
        raise ImportBagError(f"{len(episodes)} usable episode(s) in {len(bag_paths)} bag(s) (per bag: {per_bag}); "
                             "need at least 2, one for training and one for validation")
    num_val = min(len(episodes) - 1, max(1, round(len(episodes) * settings.val_fraction)))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_split(out, episodes[:-num_val])
    write_split(val_out, episodes[-num_val:])
    with tempfile.TemporaryDirectory() as cache:  # read back by the training loader before anyone trains on it
        try:
            rows = tuple(len(split) for split in load_dataset_pair(out, cache_dir=cache))
        except DatasetError as error:
            raise ImportBagError(f"the written dataset does not load back: {error}") from error
    record = dict(settings=dataclasses.asdict(settings), bags=per_bag, episodes=[len(episodes) - num_val, num_val],
                  rows=list(rows), action_dim=dims.pop(), **dataclasses.asdict(counts))
    record_path.write_text(json.dumps(record, indent=1))
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cfgrl-bags-to-dataset", description=__doc__.split("\n\n")[0])
    defaults = ImportSettings()
    parser.add_argument("bags", nargs="+", type=Path, help="rosbag2 bag directories, one or more episodes each")
    parser.add_argument("--out", type=Path, required=True, help="<name>.npz to write (and <name>-val.npz beside it)")
    parser.add_argument("--camera-topic", default=defaults.camera_topic, help="sensor_msgs/Image or CompressedImage "
                        f"topic (default: {defaults.camera_topic})")
    parser.add_argument("--action-topic", default=defaults.action_topic, help="PolicyAction, Float32MultiArray or "
                        f"Joy topic (default: {defaults.action_topic})")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help=f"frames are resized to this square size (default: {defaults.image_size})")
    parser.add_argument("--episode-gap-s", type=float, default=defaults.episode_gap_s,
                        help=f"a pause between actions longer than this starts an episode (default: {defaults.episode_gap_s})")
    parser.add_argument("--max-image-age-s", type=float, default=defaults.max_image_age_s,
                        help="Float32MultiArray and Joy actions: the newest frame may be at most this old "
                        f"(default: {defaults.max_image_age_s})")
    parser.add_argument("--min-episode-length", type=int, default=defaults.min_episode_length,
                        help=f"shorter episodes are left out (default: {defaults.min_episode_length})")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help=f"the last episodes, this fraction of them, validate (default: {defaults.val_fraction})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = ImportSettings(args.camera_topic, args.action_topic, args.image_size, args.episode_gap_s,
                                  args.max_image_age_s, args.min_episode_length, args.val_fraction)
        if args.out.suffix != ".npz":
            raise ImportBagError(f"--out must be a .npz file, got {args.out}")
        record = import_bags(args.bags, args.out, settings, args.overwrite)
    except (ImportBagError, OSError) as error:
        sys.exit(f"cfgrl-bags-to-dataset: error: {error}")
    left_out = (f"left out: {record['stale_stops']} stale-input stops, {record['without_frame']} actions without a "
                f"fresh frame, {record['short_episodes']} episode(s) under {settings.min_episode_length} rows")
    (train_episodes, val_episodes), (train_rows, val_rows) = record["episodes"], record["rows"]
    print(f"wrote {args.out} ({train_episodes} episode(s), {train_rows} rows) and {val_path_for(args.out).name} "
          f"({val_episodes} episode(s), {val_rows} rows); {left_out}")
    print(f"train on it with: cfgrl-train --dataset {args.out} --goal-mode image")


if __name__ == "__main__":
    main()
