"""cfgrl-export: turn a checkpoint into deployable artifacts of the whole guided sampler.

Each artifact maps (observations uint8 (B,H,W,3), goals, w (B,), noise (B,A)) -> actions (B,A) in
[-1, 1]: the encoders, every flow step and the guidance. w and the noise are inputs, never baked
in; flow_steps is fixed per artifact and appears in its file name and metadata. The batch
dimension is dynamic.

    cfgrl-export runs/cube/ckpt.safetensors                  # -> runs/cube/ckpt.export/
    cfgrl-export ckpt.safetensors --flow-steps 8 --formats pt2,onnx

Formats: pt2 (torch.export program, what torch-tensorrt compiles), onnx (checked against PyTorch
with onnxruntime before it is kept), tensorrt (fp16, with its cache key; needs torch-tensorrt and
a CUDA GPU; without --formats it is skipped with the reason where it cannot run, named in --formats
it must build), fp16 (not a sampler but
the checkpoint itself, weights in float16 and no optimizer state: policy_fp16.safetensors, a few MB,
the form cfgrl_ros/data/ ships; it loads like any checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cfgrl_ros.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_fp16_copy
from cfgrl_ros.engines import (
    INPUT_NAMES,
    EngineUnavailable,
    artifact_metadata,
    artifact_path,
    build_tensorrt,
    default_artifacts_dir,
    example_inputs,
    export_onnx,
    export_program,
    write_sidecar,
)
from cfgrl_ros.sampler import GuidedSampler

log = logging.getLogger("cfgrl-export")

FORMATS = ("pt2", "onnx", "tensorrt", "fp16")
FP16_CHECKPOINT = "policy_fp16.safetensors"
ONNX_TOLERANCE = 1e-4  # max abs difference of fp32 actions, ONNX Runtime vs eager PyTorch


class ExportError(RuntimeError):
    """An artifact that could not be produced or failed its check against PyTorch."""


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path | None = None, flow_steps: int = 16,
                      formats: tuple[str, ...] | None = None, max_batch: int = 1024,
                      tensorrt_device: str = "cuda") -> dict[str, Path]:
    """Write the requested artifacts (None: every format); returns {format: path}. With formats None,
    tensorrt is skipped (logged) where it cannot run; asked for by name, it is required.
    Raises CheckpointError for a bad checkpoint."""
    tensorrt_required = formats is not None and "tensorrt" in formats
    formats = FORMATS if formats is None else formats
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"unknown or no formats {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    if flow_steps < 1 or max_batch < 2:  # torch.export's dynamic batch dimension needs a range of at least 2
        raise ValueError(f"need flow_steps >= 1 and max_batch >= 2, got {flow_steps} and {max_batch}")
    checkpoint = load_checkpoint(checkpoint_path)
    out_dir = Path(out_dir) if out_dir else default_artifacts_dir(checkpoint_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    sampler = GuidedSampler(checkpoint.policy.cpu().eval())
    program, written = None, {}
    for kind in tqdm(formats, desc="export", unit="artifact"):
        if kind == "fp16":  # the checkpoint, not a sampler: no flow_steps, no sidecar
            written[kind] = save_fp16_copy(checkpoint, out_dir / FP16_CHECKPOINT)
            log.info("wrote the fp16 checkpoint %s", written[kind])
            continue
        path = artifact_path(out_dir, kind, flow_steps)
        log.info("exporting %s -> %s", kind, path)
        if kind in ("pt2", "onnx") and program is None:
            program = export_program(sampler, flow_steps, max_batch)
        if kind == "pt2":
            torch.export.save(program, str(path))
        elif kind == "onnx":  # checked under a temporary name, so a failed check never leaves a usable file
            unchecked = export_onnx(program, path.with_name(f".{path.name}.unchecked"))
            try:
                verify_onnx(unchecked, sampler, flow_steps)
            except BaseException:  # a failed check, or anything else on the way: no usable-looking file left
                unchecked.unlink(missing_ok=True)
                raise
            os.replace(unchecked, path)
        else:
            try:
                build_tensorrt(checkpoint, flow_steps, path, tensorrt_device, max_batch)
            except EngineUnavailable as error:
                if tensorrt_required:
                    raise ExportError(f"cannot build TensorRT here: {error}") from error
                log.warning("skipping tensorrt: %s", error)
                continue
            written[kind] = path  # its sidecar is the TensorRT cache key, written by build_tensorrt
            continue
        write_sidecar(path, artifact_metadata(checkpoint, flow_steps, kind, max_batch))
        written[kind] = path
    write_manifest(out_dir, checkpoint, checkpoint_path, flow_steps, written)
    return written


def verify_onnx(path: Path, sampler: GuidedSampler, flow_steps: int, batch_sizes: tuple[int, ...] = (1, 3)) -> float:
    """Max abs difference between ONNX Runtime (CPU) and eager PyTorch on the same inputs and noise."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch_size in batch_sizes:
        inputs = example_inputs(sampler.policy.config, batch_size, seed=batch_size)
        inputs = (inputs[0], inputs[1], torch.linspace(0.0, 3.0, batch_size), inputs[3])  # w per sample
        with torch.inference_mode():
            expected = sampler(*inputs, flow_steps).numpy()
        (actual,) = session.run(None, {name: x.numpy() for name, x in zip(INPUT_NAMES, inputs)})
        worst = max(worst, float(np.abs(actual - expected).max()))
    if worst > ONNX_TOLERANCE:
        raise ExportError(f"{path}: ONNX Runtime differs from PyTorch by {worst:.2e} (> {ONNX_TOLERANCE:.0e})")
    log.info("onnx check: max |onnxruntime - pytorch| = %.2e over batches %s", worst, batch_sizes)
    return worst


def write_manifest(out_dir: Path, checkpoint: Checkpoint, checkpoint_path: str | Path, flow_steps: int,
                   written: dict[str, Path]) -> Path:
    manifest = {
        "checkpoint": str(Path(checkpoint_path).resolve()),
        "model_sha256": checkpoint.metadata.get("sha256", ""),
        "config": checkpoint.config.to_dict(),
        "flow_steps": flow_steps,
        "inputs": {"observations": "uint8 (B, H, W, 3)",
                   "goals": "uint8 (B, H, W, 3)" if checkpoint.config.goal_mode == "image" else "float32 (B, goal_dim)",
                   "w": "float32 (B,)", "noise": "float32 (B, action_dim)"},
        "outputs": {"actions": "float32 (B, action_dim) in [-1, 1]"},
        "artifacts": {kind: path.name for kind, path in written.items()},
    }
    path = out_dir / f"manifest_k{flow_steps}.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    if isinstance(previous, dict) and previous.get("model_sha256") == manifest["model_sha256"]:
        # An earlier run with other --formats, same model: its artifacts still on disk stay listed.
        kept = {kind: name for kind, name in previous.get("artifacts", {}).items() if (out_dir / name).is_file()}
        manifest["artifacts"] = {**kept, **manifest["artifacts"]}
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cfgrl-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a cfgrl_ros .safetensors checkpoint")
    parser.add_argument("--out", help="artifacts directory (default: <checkpoint>.export/ beside it)")
    parser.add_argument("--flow-steps", type=int, default=16, help="Euler steps unrolled into each artifact")
    parser.add_argument("--formats", default=None, help=f"comma-separated subset of {','.join(FORMATS)} (default: all; "
                        "tensorrt then only where it can run, while named here it must)")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch the artifacts accept")
    parser.add_argument("--device", default="cuda", help="device the TensorRT engine is built for")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in (log.name, "cfgrl_ros"):  # our progress lines, not the exporters' chatter
        logging.getLogger(name).setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        written = export_checkpoint(args.checkpoint, args.out, args.flow_steps,
                                    None if args.formats is None else
                                    tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                                    args.max_batch, args.device)
    except (CheckpointError, ExportError, EngineUnavailable, ValueError, OSError) as error:  # OSError: e.g. --out
        print(f"cfgrl-export: error: {error}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
