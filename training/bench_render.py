"""How the generator's rendering options change the images, and what they cost (docs/benchmarks.md).

    python -m training.bench_render --envs cube-single,scene,puzzle-3x3 --frames 100

For each env, one play episode of `--frames` steps is rolled out once per rendering option, with the same
seed, so the physics and the oracle's actions are the same in every run and only the images can differ.
Each option's frames are compared with OGBench's own (`--render-mode env`, shadow map 4096): mean and max
absolute difference (0-255) and the share of pixels with any channel changed. Time is wall and process CPU
(llvmpipe renders in the process's own threads) per transition, model compilation excluded; for replay
also its two phases' wall time: the physics-only rollouts (oracle + physics) and the batched rendering.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported

import numpy as np  # noqa: E402

from training.generate_dataset import ENVS, GenerationConfig, Shard, ShardCollector  # noqa: E402

REFERENCE = ("env", 1, 4096)  # (render mode, tiles per side, shadow map): what OGBench's generator does
OPTIONS = (("replay", 1, 4096), ("replay", 16, 4096), ("env", 1, 1024), ("env", 1, 256), ("replay", 16, 1024))


def render_episode(env: str, frames: int, mode: str, tiles: int, shadow: int, seed: int
                   ) -> tuple[np.ndarray, float, float, dict[str, float]]:
    """(observations, wall s, CPU s, {phase: wall s}) per transition of one seeded play episode."""
    cfg = GenerationConfig(env, "play", num_episodes=1, num_val_episodes=0, episode_length=frames,
                           seed=seed, shadow_size=shadow, render_mode=mode, render_tiles=tiles, shard_episodes=1)
    collector = ShardCollector(cfg)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        arrays, _ = collector.collect(Shard(0, "train", 1), report=lambda _: None)
        rows = len(arrays["observations"])
        phases = {phase: seconds / rows for phase, seconds in collector.seconds.items()}
        return arrays["observations"], (time.perf_counter() - wall) / rows, (time.process_time() - cpu) / rows, phases
    finally:
        collector.close()


def difference(images: np.ndarray, reference: np.ndarray) -> tuple[float, int, float]:
    """Mean and max absolute difference, and the share of pixels with any channel changed."""
    delta = np.abs(images.astype(np.int16) - reference.astype(np.int16))
    return float(delta.mean()), int(delta.max()), float(delta.any(axis=-1).mean())


def option_name(mode: str, tiles: int, shadow: int) -> str:
    return f"{mode}, {tiles} tile{'s' if tiles > 1 else ''}/side, shadow {shadow}" if mode == "replay" \
        else f"{mode}, shadow {shadow}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default="cube-single", help=f"comma-separated, from {', '.join(ENVS)}")
    parser.add_argument("--frames", type=int, default=100, help="transitions per episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    unknown = set(envs) - set(ENVS)
    if unknown:
        parser.error(f"unknown envs {sorted(unknown)}; choose from {', '.join(ENVS)}")

    lines = [f"{args.frames} transitions per env, seed {args.seed}; difference from `{option_name(*REFERENCE)}` "
             "(OGBench's own frames): mean / max / share of pixels changed", "",
             "| env | rendering | difference | wall ms / transition | CPU ms / transition "
             "| replay: physics / render wall ms |", "|---|---|---|---|---|---|"]
    for env in envs:
        reference, wall, cpu, _ = render_episode(env, args.frames, *REFERENCE, args.seed)
        lines.append(f"| {env} | {option_name(*REFERENCE)} | reference | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | |")
        for option in OPTIONS:
            images, wall, cpu, phases = render_episode(env, args.frames, *option, args.seed)
            mean, largest, share = difference(images, reference)
            split = f"{phases['rollout'] * 1e3:.1f} / {phases['render'] * 1e3:.1f}" if option[0] == "replay" else ""
            lines.append(f"| {env} | {option_name(*option)} | {mean:.3f} / {largest} / {share:.2%} | "
                         f"{wall * 1e3:.1f} | {cpu * 1e3:.1f} | {split} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(f"\n{report}")
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
