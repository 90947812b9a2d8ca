"""cfgrl-benchmark: latency, throughput and memory of each inference engine, as a Markdown table.

    cfgrl-benchmark --engines torch,onnxruntime,compiled              # random visual-cube policy
    cfgrl-benchmark --checkpoint ckpt.safetensors --device cuda --engines torch,cuda_graph,tensorrt

Per engine: load time (export/compile/capture plus warm-up), batch-1 latency p50/p99 at each flow
step count, throughput (actions/s) at the large batches with 16 steps, and peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on GPU). Each engine runs in a fresh process so that its peak
memory and threads are its own. Without --checkpoint a random-init policy of the visual-cube
shapes (action_dim 5, 64x64 images, oracle goal_dim 3 or image goals) is used: timing only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cfgrl_ros.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cfgrl_ros.engines import BACKENDS, EngineUnavailable, example_inputs, load_engine
from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig
from training.machine import cpu_model, load_average

THROUGHPUT_FLOW_STEPS = 16


def random_checkpoint(directory: Path, goal_mode: str) -> Path:
    """A random-init policy with the visual-cube shapes (action_dim 5, oracle goal_dim 3)."""
    torch.manual_seed(0)
    return save_checkpoint(directory / f"random-{goal_mode}.safetensors",
                           CFGRLPolicy(PolicyConfig(action_dim=5, goal_mode=goal_mode, goal_dim=3)))


def latency_ms(engine, flow_steps: int, iterations: int) -> tuple[float, float]:
    """p50 and p99 of one batch-1 inference, milliseconds, inputs already on the device (compute only:
    the node also pays the upload and the copy back)."""
    inputs = example_inputs(engine.config, 1, engine.device)
    for _ in range(max(3, iterations // 20)):
        engine.infer(*inputs, flow_steps)
    _synchronize(engine.device)  # no warm-up work left queued in the first timed call
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        engine.infer(*inputs, flow_steps)
        _synchronize(engine.device)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def throughput(engine, batch_size: int, min_seconds: float) -> float:
    """Actions per second at batch_size and 16 flow steps, over at least one call and min_seconds."""
    inputs = example_inputs(engine.config, batch_size, engine.device)
    engine.infer(*inputs, THROUGHPUT_FLOW_STEPS)
    _synchronize(engine.device)
    calls, start = 0, time.perf_counter()
    while calls < 1 or time.perf_counter() - start < min_seconds:
        engine.infer(*inputs, THROUGHPUT_FLOW_STEPS)
        _synchronize(engine.device)
        calls += 1
    return batch_size * calls / (time.perf_counter() - start)


def benchmark_engine(checkpoint: str, backend: str, device: str, flow_steps: tuple[int, ...], iterations: int,
                     batch_sizes: tuple[int, ...], min_seconds: float, threads: int) -> dict:
    """One engine, measured in the calling process (run it in a fresh one)."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        engine = load_engine(checkpoint, backend, device, flow_steps=16, onnx_threads=threads)
    except EngineUnavailable as error:
        return {"engine": backend, "unavailable": str(error)}
    label = f"auto: {engine.name}" if backend == "auto" else engine.name  # two rows of one engine stay apart
    result = {"engine": label, "load_s": time.perf_counter() - start}
    result["latency"] = {k: latency_ms(engine_for_steps(engine, checkpoint, k, threads), k, iterations)
                         for k in flow_steps}
    result["throughput"] = {b: throughput(engine, b, min_seconds) for b in batch_sizes}
    if device.startswith("cuda"):
        result["memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def engine_for_steps(engine, checkpoint: str, flow_steps: int, threads: int):
    """The engine itself, or for a TensorRT program (built for one step count) the program for flow_steps."""
    if engine.name != "tensorrt" or flow_steps == engine.flow_steps:
        return engine
    return load_engine(checkpoint, engine.name, str(engine.device), flow_steps=flow_steps, onnx_threads=threads)


def machine_description(device: str, threads: int) -> str:
    parts = [f"CPU {cpu_model()} ({os.cpu_count()} cores, load average {load_average()})",
             f"torch {torch.__version__}", f"{threads} intra-op thread(s)"]
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    else:
        parts.append("no GPU")
    return ", ".join(parts)


def markdown_table(results: list[dict], flow_steps: tuple[int, ...], batch_sizes: tuple[int, ...],
                   device: str) -> str:
    memory = "peak GPU alloc MiB" if device.startswith("cuda") else "peak RSS MiB"
    header = (["engine", "load s"] + [f"b1 K={k} p50 / p99 ms" for k in flow_steps]
              + [f"b{b} K={THROUGHPUT_FLOW_STEPS} actions/s" for b in batch_sizes] + [memory])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        if "unavailable" in result:
            lines.append(f"| {result['engine']} | unavailable: {result['unavailable']} |")
            continue
        cells = [result["engine"], f"{result['load_s']:.1f}"]
        cells += [f"{p50:.2f} / {p99:.2f}" for p50, p99 in (result["latency"][k] for k in flow_steps)]
        cells += [f"{result['throughput'][b]:,.0f}" for b in batch_sizes]
        cells.append(f"{result['memory_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers >= 1 (a batch of 0 would time nothing and report 0/s)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return values[0]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cfgrl-benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="policy to time (default: random-init visual-cube shapes)")
    parser.add_argument("--goal-mode", choices=("oracle", "image"), default="oracle",
                        help="goal mode of the random policy (ignored with --checkpoint)")
    parser.add_argument("--engines", default="torch,compiled,onnxruntime",
                        help=f"comma-separated, from {', '.join((*BACKENDS, 'auto'))}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flow-steps", type=_positive_ints, default=(8, 16, 32), help="batch-1 latency step counts")
    parser.add_argument("--iterations", type=_positive_int, default=200, help="timed batch-1 calls per step count")
    parser.add_argument("--batches", type=_positive_ints, default=(64, 1024), help="throughput batch sizes")
    parser.add_argument("--min-seconds", type=_positive_float, default=2.0, help="least time per throughput measurement")
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--workdir", help="keep the random policy and its ONNX exports here, so a second run "
                        "times cached loads (default: a temporary directory)")
    parser.add_argument("--out", help="also write the Markdown here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {*BACKENDS, "auto"}
    problem = f"unknown engines {sorted(unknown)}" if unknown else None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problem = f"--device {args.device}: this machine has no CUDA device"
    if args.checkpoint and not problem:
        try:
            load_checkpoint(args.checkpoint)  # here, not as a traceback from the engine's process
        except CheckpointError as error:
            problem = str(error)
    if problem:
        print(f"cfgrl-benchmark: error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cfgrl-benchmark-") as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or str(random_checkpoint(workdir, args.goal_mode))
        results = []
        for backend in tqdm(engines, desc="engines", unit="engine"):
            # A fresh process per engine: its own peak RSS, threads and compile state.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                results.append(pool.submit(benchmark_engine, checkpoint, backend, args.device, args.flow_steps,
                                           args.iterations, args.batches, args.min_seconds, args.threads).result())
    title = f"policy: {args.checkpoint or f'random init, visual-cube shapes, {args.goal_mode} goals'}"
    memory_note = ("peak GPU memory is torch's allocator only (TensorRT and onnxruntime allocate their own)"
                   if args.device.startswith("cuda") else "peak RSS includes each engine's load (export, compile)")
    report = "\n".join([title, "", machine_description(args.device, args.threads), "",
                        markdown_table(results, args.flow_steps, args.batches, args.device), "",
                        f"Latency: median and p99 of {args.iterations} timed batch-1 calls per step count (p99 of "
                        f"fewer than 1000 calls is close to the maximum); {memory_note}."])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
