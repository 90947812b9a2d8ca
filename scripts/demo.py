#!/usr/bin/env python3
"""The main job: the embedded default policy drives a simulated task through ROS 2, for w=1 and w=3.

Two processes talk over DDS (loopback only): the policy node `cfgrl` and the sim node `cfgrl_sim`
in lockstep (one env step per action; the policy runs on the sim's /clock). This script sets w
through the policy node's parameter service (as `ros2 param set /cfgrl w 3` does), chooses each
episode's task and seed through the sim node's parameters, starts it with the sim's `reset`
service and prints the success the sim reports, in the direct evaluator's table format.

The embedded default (cfgrl_ros/data/default_policy.safetensors, model card beside it) is a CFGRL
policy for the toy PointReach task (a dot seen by a 16x16 camera, suboptimal demonstrations),
trained on this project's 2-core CPU: no visual-cube policy trained at the paper's scale exists
yet, because that needs the GPU machine (see docs/reproduce.md). By default it runs the 5
evaluation tasks x 10 episodes for each w, at most 30 steps each (episodes end at the goal): under
a minute on a 2-core CPU. A visual-cube policy of your own runs the same way:

    bash scripts/demo.sh                                          # setup + the default
    python scripts/demo.py --env visual-cube-single-v0 --policy my_cube.safetensors --tasks 2 3 \
        --episodes-per-task 1          # one <=200-step episode per task and w: ~45 s each on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_POLICY = REPO_ROOT / "cfgrl_ros" / "data" / "default_policy.safetensors"
# Measured lockstep cost per step on the 2-core CPU (render + policy + DDS round trip).
SECONDS_PER_STEP_CPU = {"pointreach": 0.02, "default": 0.25}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default=str(DEFAULT_POLICY), help="checkpoint (default: the embedded one)")
    parser.add_argument("--env", default="pointreach", help="pointreach or an OGBench visual env id")
    parser.add_argument("--w", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--episodes-per-task", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="episode limit (default: the env's own: pointreach 30, visual-cube-single 200)")
    parser.add_argument("--shadow-size", type=int, default=1024, help="shadow map size; 0 = OGBench's 4096")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "runs" / "demo"))
    parser.add_argument("--ros-domain-id", type=int, default=None,
                        help="ROS domain of the demo's nodes (default: a free one of 30-59, claimed with a lock file)")
    return parser


def approximate(seconds: float) -> str:
    return f"~{seconds:.0f} s" if seconds < 90 else f"~{seconds / 60:.0f} min"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.policy).is_file():
        parser.error(f"no policy checkpoint at {args.policy}; pass --policy PATH")
    from cfgrl_ros.checkpoint import CheckpointError
    from cfgrl_ros.ros_domain import isolate_process
    from training.evaluate import EvaluationError, episode_limit, markdown_table, write_report
    from training.ros_evaluate import evaluate_through_ros

    try:
        domain_id = isolate_process(args.ros_domain_id)  # loopback only, a domain no other run uses
        max_steps = args.max_steps if args.max_steps is not None else episode_limit(args.env)
    except (ValueError, RuntimeError, OSError) as error:  # EvaluationError too: an unknown env; OSError: the lock dir
        parser.error(str(error))
    episodes = len(args.w) * len(args.tasks) * args.episodes_per_task
    seconds_per_step = SECONDS_PER_STEP_CPU.get(args.env, SECONDS_PER_STEP_CPU["default"])
    print(f"demo: {args.env}, tasks {args.tasks}, {args.episodes_per_task} episode(s) per task and w, "
          f"w in {args.w}: {episodes} episodes of at most {max_steps} steps, through the policy node and "
          f"the sim node over ROS 2 (lockstep, loopback only, ROS_DOMAIN_ID {domain_id}). Worst case "
          f"{approximate(episodes * max_steps * seconds_per_step)} of stepping on a 2-core CPU; an episode ends "
          "early when the goal is reached.", flush=True)
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out-dir {out_dir}: {error}")
    try:
        results = evaluate_through_ros(args.policy, args.env, args.w, episodes_per_task=args.episodes_per_task,
                                       tasks=args.tasks, seed=args.seed, max_steps=max_steps,
                                       shadow_size=args.shadow_size, log_dir=out_dir / "logs")
    except (EvaluationError, CheckpointError) as error:
        started = (out_dir / "logs").is_dir()  # refused before any node started: no logs to point at
        parser.error(f"{error}" + (f" (node logs: {out_dir / 'logs'})" if started else ""))
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the nodes were stopped", file=sys.stderr)
        return 130
    try:
        paths = write_report(results, out_dir)
    except OSError as error:
        parser.error(f"could not write the report to {out_dir}: {error}")
    print()
    for row in results["results"]:
        overall = row["overall"]
        tasks = ", ".join(f"task {t['task']} {t['successes']}/{t['episodes']}" for t in row["tasks"])
        print(f"w={row['w']:g}: success {overall['successes']}/{overall['episodes']} "
              f"({100 * overall['rate']:.0f}%)  [{tasks}]")
    print(f"\n{markdown_table(results)}\n")
    print(f"{results['env_steps']} env steps in {results['wall_time_s']:.0f} s; report: {paths['markdown']}; "
          f"node logs: {results['logs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
