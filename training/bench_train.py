"""Training throughput benchmark: steps/s of the real loop (sampling + augmentation + update) and of
the update alone, at the visual-cube shapes (64x64x3 images, 5-D actions, 3-D oracle goals).

    python -m training.bench_train --rows 20000 --batch-size 256 --steps 50           # CPU
    python -m training.bench_train --device cuda --rows 200000 --steps 500 --compile  # GPU

The dataset is synthetic but in OGBench's file format, loaded through training.data like a real
one, so the data pipeline measured is the one training uses. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig
from training.data import GoalBatchSampler, load_dataset_pair
from training.machine import cpu_model, load_average


def write_synthetic_dataset(directory: Path, rows: int, episode_length: int = 1001, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    terminals = np.zeros(rows, bool)
    terminals[episode_length - 1::episode_length] = True
    terminals[-1] = True
    arrays = dict(
        observations=rng.integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8),
        actions=rng.uniform(-1, 1, (rows, 5)).astype(np.float32),
        terminals=terminals,
        oracle_reps=rng.normal(size=(rows, 3)).astype(np.float32),
    )
    path = directory / "synthetic-v0.npz"
    np.savez(path, **arrays)  # uncompressed: writing is quick and loading takes the same path
    val = {k: v[: min(rows, 2 * episode_length)] for k, v in arrays.items()}
    val["terminals"] = val["terminals"].copy()
    val["terminals"][-1] = True
    np.savez(directory / "synthetic-v0-val.npz", **val)
    return path


def time_steps(step, steps: int, device: torch.device) -> tuple[list[float], float]:
    """(seconds per step, seconds for all of them). On CUDA nothing waits between steps, as in training
    (a sync per step would stop the CPU preparing the next batch while the GPU runs): a step's time is
    the GPU time between the ends of the previous step and its own (CUDA events), and one sync ends the run."""
    if device.type != "cuda":
        durations, start = [], time.perf_counter()
        for _ in range(steps):
            begin = time.perf_counter()
            step()
            durations.append(time.perf_counter() - begin)
        return durations, time.perf_counter() - start
    torch.cuda.synchronize(device)
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    start = time.perf_counter()
    ends[0].record()
    for end in ends[1:]:
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) / 1e3 for a, b in zip(ends, ends[1:])], time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--goal-mode", choices=["oracle", "image"], default="oracle")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss")
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        train_data, _ = load_dataset_pair(write_synthetic_dataset(Path(tmp), args.rows))
        sampler = GoalBatchSampler(train_data, args.goal_mode, args.batch_size, device, seed=0)
        config = PolicyConfig(action_dim=5, goal_mode=args.goal_mode, goal_dim=3)
        policy = CFGRLPolicy(config).to(device).train()
        optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4, fused=device.type == "cuda")
        model = torch.compile(policy) if args.compile else policy
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        fixed_batch = sampler.sample()

        def update(batch) -> None:
            with autocast:
                loss = model(batch, sampler.generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        results = {}
        for name, step in [("update only (fixed batch)", lambda: update(fixed_batch)),
                           ("real loop (sample + augment + update)", lambda: update(sampler.sample()))]:
            time_steps(step, args.warmup, device)
            results[name] = time_steps(step, args.steps, device)

    machine = f"CPU {cpu_model()}, {torch.get_num_threads()} threads, load average {load_average()}"
    if device.type == "cuda":
        machine += f"; GPU {torch.cuda.get_device_name(device)}, bf16 autocast"
    # p99 by linear interpolation between the two nearest steps: below 100 steps it is close to the max.
    lines = [f"machine: {machine}; torch {torch.__version__}; batch {args.batch_size}; goal mode {args.goal_mode}; "
             f"{args.rows} rows; compile={args.compile}; {args.steps} timed steps after {args.warmup} warm-up", "",
             "| what | steps/s (steps / elapsed) | median ms | p99 ms |", "|---|---|---|---|"]
    for name, (durations, elapsed) in results.items():
        median = statistics.median(durations)
        p99 = float(np.percentile(durations, 99))
        lines.append(f"| {name} | {len(durations) / elapsed:.1f} | {median * 1e3:.1f} | {p99 * 1e3:.1f} |")
    report = "\n".join(lines)
    print(f"\n{report}")
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
