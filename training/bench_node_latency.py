"""End-to-end benchmark of the policy node across processes: latency, flood, soak.

    python -m training.bench_node_latency                         # latency (both triggers) + flood
    python -m training.bench_node_latency --soak-minutes 30       # + soak: node RSS growth at 30 Hz
    python -m training.bench_node_latency --device cuda --backend cuda_graph --checkpoint ckpt.safetensors

The node runs as its own process (`python -m cfgrl_ros.nodes.policy_node`, config/cfgrl.yaml plus
overrides); this process publishes 64x64 rgb8 camera frames stamped with the system clock and
receives the PolicyActions, so latency = receipt time - image_stamp (one clock, one machine).
  latency  camera at 30 Hz. trigger=image (cap 100 Hz, above the camera rate): one action per
           frame. trigger=timer at 30 Hz: the first action computed from each frame (it waits for
           the next tick, so up to one period more).
  flood    camera at 200 Hz, control_rate_hz 30: the achieved action rate and the frames the node
           dropped (from its /diagnostics), per trigger.
  soak     camera at 30 Hz, trigger=image, for --soak-minutes: the node's RSS every 10 s after a
           warm-up minute; growth and slope.
Without --checkpoint a random-init policy with the visual-cube shapes is used (timing only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cfgrl_ros.ros_domain import isolate_process
from training.machine import cpu_model, load_average

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "config" / "cfgrl.yaml"
STARTUP_S = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="policy checkpoint (default: random-init visual-cube shapes)")
    parser.add_argument("--goal-mode", choices=("image", "oracle"), default="image",
                        help="goal mode of the random policy (image goals encode a second image per action)")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--flow-steps", type=int, default=16)
    parser.add_argument("--camera-hz", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement time per latency run")
    parser.add_argument("--flood-hz", type=float, default=200.0)
    parser.add_argument("--flood-seconds", type=float, default=10.0)
    parser.add_argument("--soak-minutes", type=float, default=0.0, help="0 = no soak")
    parser.add_argument("--ros-domain-id", type=int, default=None,
                        help="ROS domain (default: a free one of 30-59, claimed with a lock file)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: latency,flood")
    parser.add_argument("--out", help="write all figures as JSON here")
    return parser.parse_args(argv)


def random_checkpoint(directory: Path, goal_mode: str) -> Path:
    import torch

    from cfgrl_ros.checkpoint import save_checkpoint
    from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig

    torch.manual_seed(0)
    return save_checkpoint(directory / f"random-{goal_mode}.safetensors",
                           CFGRLPolicy(PolicyConfig(action_dim=5, goal_mode=goal_mode, goal_dim=3)))


class Session:
    """One node process and the probe that drives it."""

    def __init__(self, args: argparse.Namespace, checkpoint: Path, log_dir: Path, name: str, **overrides):
        from cfgrl_ros.nodes.probe import PolicyNodeProcess, PolicyProbe

        parameters = {"policy": checkpoint, "backend": args.backend, "device": args.device,
                      "cpu_threads": args.cpu_threads, "flow_steps": args.flow_steps, **overrides}
        self.node = PolicyNodeProcess(log_dir / f"{name}.log", CONFIG, parameters, dict(os.environ))
        self.probe = PolicyProbe()
        self.probe.alive_checks.append(self.node.check_alive)
        self.goal_mode = None

    def start(self, goal_mode: str) -> None:
        goal_topic = "goal/image" if goal_mode == "image" else "goal/vector"
        self.probe.wait_for_node(goal_topic, STARTUP_S)
        rng = np.random.default_rng(1)
        if goal_mode == "image":
            self.probe.publish_goal_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        else:
            self.probe.publish_goal_vector([0.1, -0.2, 0.3])
        # One action through the whole path before measuring (first-call costs, discovery of the action topic).
        frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        self.probe.wait_for_action(lambda m: m.inference_time_ms > 0, "a first action", 60,
                                   meanwhile=lambda: self.probe.publish_camera(frame))

    def stream(self, hz: float, seconds: float, progress: str | None = None) -> tuple[dict[int, int], int]:
        """Publish distinct frames at hz for seconds; {image stamp ns: publish time ns} and the first action index."""
        from cfgrl_ros.nodes.probe import ns_of

        frames = np.random.default_rng(2).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
        published: dict[int, int] = {}
        start_index = len(self.probe.actions)
        period = 1.0 / hz
        begin = next_due = time.monotonic()
        bar = tqdm(total=int(seconds), desc=progress, unit="s", leave=False) if progress else None
        while (now := time.monotonic()) - begin < seconds:
            if now >= next_due:
                stamp = self.probe.publish_camera(frames[len(published) % len(frames)])
                published[ns_of(stamp)] = time.time_ns()
                next_due += period
                if next_due < now:  # fell behind (loaded machine): skip, never burst
                    next_due = now + period
            self.probe.executor.spin_once(timeout_sec=max(0.0, min(next_due - time.monotonic(), 0.01)))
            if bar is not None and int(now - begin) > bar.n:
                bar.update(int(now - begin) - bar.n)
        if bar is not None:
            bar.close()
        self.probe.spin_for(0.5)  # actions still on their way
        return published, start_index

    def diagnostics(self) -> dict:
        return self.probe.next_diagnostics(timeout_s=5)

    def close(self) -> int:
        self.probe.destroy()
        return self.node.stop()


def latency_run(args, checkpoint: Path, log_dir: Path, trigger: str) -> dict:
    from cfgrl_ros.nodes.probe import ns_of

    rate = 100.0 if trigger == "image" else args.camera_hz
    session = Session(args, checkpoint, log_dir, f"latency-{trigger}", trigger=trigger, control_rate_hz=rate)
    try:
        session.start(args.goal_mode)
        published, start = session.stream(args.camera_hz, args.seconds, f"latency {trigger}")
        first: dict[int, int] = {}  # image stamp -> receipt of the first action computed from it
        inference_ms = []
        for received in session.probe.actions[start:]:
            stamp = ns_of(received.message.image_stamp)
            if stamp in published and received.message.inference_time_ms > 0 and stamp not in first:
                first[stamp] = received.wall_ns
                inference_ms.append(received.message.inference_time_ms)
        latencies = np.array([(first[s] - s) / 1e6 for s in first])
        report = session.diagnostics()
        return {"trigger": trigger, "control_rate_hz": rate, "camera_hz": args.camera_hz,
                "frames": len(published), "frames_acted_on": len(first),
                "latency_ms_p50": float(np.percentile(latencies, 50)), "latency_ms_p99": float(np.percentile(latencies, 99)),
                "latency_ms_max": float(latencies.max()),
                "inference_ms_p50": float(np.percentile(inference_ms, 50)),
                "inference_ms_p99": float(np.percentile(inference_ms, 99)),
                "engine": report["engine"], "dropped_frames": int(report["dropped_frames"])}
    finally:
        session.close()


def flood_run(args, checkpoint: Path, log_dir: Path, trigger: str, control_rate_hz: float = 30.0) -> dict:
    session = Session(args, checkpoint, log_dir, f"flood-{trigger}", trigger=trigger, control_rate_hz=control_rate_hz)
    try:
        session.start(args.goal_mode)
        before = session.diagnostics()
        published, start = session.stream(args.flood_hz, args.flood_seconds, f"flood {trigger}")
        computed = [r for r in session.probe.actions[start:] if r.message.inference_time_ms > 0]
        span = (computed[-1].monotonic - computed[0].monotonic) if len(computed) > 1 else float("nan")
        after = session.diagnostics()
        return {"trigger": trigger, "control_rate_hz": control_rate_hz, "camera_hz_target": args.flood_hz,
                "camera_hz_achieved": len(published) / args.flood_seconds,
                "action_rate_hz": (len(computed) - 1) / span if span == span and span > 0 else 0.0,
                "node_camera_rate_hz": float(after["camera_rate_hz"]),
                "dropped_frames": int(after["dropped_frames"]) - int(before["dropped_frames"]),
                "frames_published": len(published), "engine": after["engine"]}
    finally:
        session.close()


def soak_run(args, checkpoint: Path, log_dir: Path) -> dict:
    from cfgrl_ros.nodes.probe import ns_of

    session = Session(args, checkpoint, log_dir, "soak", trigger="image", control_rate_hz=100.0)
    try:
        session.start(args.goal_mode)
        session.stream(args.camera_hz, 60.0, "soak warm-up")  # allocator and DDS caches settle first
        samples = []  # (minutes since start, RSS MiB)
        latencies = []
        begin = time.monotonic()
        total_s = args.soak_minutes * 60.0
        with tqdm(total=int(total_s), desc="soak", unit="s") as bar:
            while (elapsed := time.monotonic() - begin) < total_s:
                samples.append((elapsed / 60.0, session.node.rss_bytes() / 2**20))
                published, start = session.stream(args.camera_hz, min(10.0, total_s - elapsed))
                latencies += [(r.wall_ns - ns_of(r.message.image_stamp)) / 1e6 for r in session.probe.actions[start:]
                              if r.message.inference_time_ms > 0 and ns_of(r.message.image_stamp) in published]
                session.probe.actions.clear()  # this process must not be what grows
                session.probe.diagnostics.clear()
                bar.update(int(time.monotonic() - begin) - bar.n)
        samples.append(((time.monotonic() - begin) / 60.0, session.node.rss_bytes() / 2**20))
        minutes, rss = np.array(samples).T
        slope = float(np.polyfit(minutes, rss, 1)[0]) if len(samples) > 2 else float("nan")
        report = session.diagnostics()
        return {"minutes": float(minutes[-1]), "camera_hz": args.camera_hz, "rss_mib_start": float(rss[0]),
                "rss_mib_end": float(rss[-1]), "rss_mib_max": float(rss.max()),
                "rss_growth_mib": float(rss[-1] - rss[0]), "rss_slope_mib_per_min": slope,
                "actions": len(latencies), "latency_ms_p50": float(np.percentile(latencies, 50)),
                "latency_ms_p99": float(np.percentile(latencies, 99)),
                "dropped_frames": int(report["dropped_frames"]), "inference_errors": int(report["inference_errors"]),
                "rss_samples": samples}
    finally:
        session.close()


def machine() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
            f"{platform.python_version()}, load average {load_average()}")


def markdown(results: dict) -> str:
    lines = [f"machine: {results['machine']}", ""]
    if results.get("latency"):
        lines += ["| trigger | control Hz | camera Hz | frames acted on | latency p50 ms | p99 ms | max ms | inference p50 ms | p99 ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["latency"]:
            lines.append(f"| {r['trigger']} | {r['control_rate_hz']:g} | {r['camera_hz']:g} | {r['frames_acted_on']}/{r['frames']} "
                         f"| {r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | {r['latency_ms_max']:.1f} "
                         f"| {r['inference_ms_p50']:.2f} | {r['inference_ms_p99']:.2f} |")
        lines.append("")
    if results.get("flood"):
        lines += ["| trigger | control Hz | camera Hz sent | actions/s | frames dropped / sent |", "|---|---|---|---|---|"]
        for r in results["flood"]:
            lines.append(f"| {r['trigger']} | {r['control_rate_hz']:g} | {r['camera_hz_achieved']:.0f} "
                         f"| {r['action_rate_hz']:.1f} | {r['dropped_frames']} / {r['frames_published']} |")
        lines.append("")
    if results.get("soak"):
        r = results["soak"]
        lines += [f"soak {r['minutes']:.1f} min at {r['camera_hz']:g} Hz: RSS {r['rss_mib_start']:.1f} -> "
                  f"{r['rss_mib_end']:.1f} MiB (max {r['rss_mib_max']:.1f}, slope {r['rss_slope_mib_per_min']:+.2f} MiB/min), "
                  f"{r['actions']} actions, latency p50 {r['latency_ms_p50']:.2f} ms p99 {r['latency_ms_p99']:.2f} ms, "
                  f"inference errors {r['inference_errors']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="cfgrl_bench_node_"))
    # Own domain, localhost discovery, logs in a temp dir: for this process and the node it starts.
    isolate_process(args.ros_domain_id)
    os.environ["ROS_LOG_DIR"] = str(log_dir / "ros")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    import rclpy

    rclpy.init()
    try:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(log_dir, args.goal_mode)
        skip = set(filter(None, args.skip.split(",")))
        results = {"machine": machine(), "backend": args.backend, "device": args.device,
                   "flow_steps": args.flow_steps, "goal_mode": args.goal_mode, "checkpoint": str(checkpoint)}
        if "latency" not in skip:
            results["latency"] = [latency_run(args, checkpoint, log_dir, trigger) for trigger in ("image", "timer")]
        if "flood" not in skip:
            results["flood"] = [flood_run(args, checkpoint, log_dir, trigger) for trigger in ("timer", "image")]
        if args.soak_minutes > 0:
            results["soak"] = soak_run(args, checkpoint, log_dir)
        results["machine_after"] = machine()
    finally:
        rclpy.try_shutdown()
    print(markdown(results))
    print(f"node logs: {log_dir}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
