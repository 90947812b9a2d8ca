"""Checkpoints: one safetensors file, loaded without executing any code.

The file holds the policy weights under `policy.*`, optionally the training state under
`train.*` (the optimizer's moments; batches are reseeded from the step) for resuming, and string metadata: the full PolicyConfig,
the goal mode, the dataset fingerprint, the code version, and a SHA-256 of every tensor's bytes so
that silent corruption (a flipped bit, a half-copied file) is caught at load time, not by a robot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import cfgrl_ros
from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig

FORMAT = "cfgrl_ros/checkpoint/v1"
POLICY_PREFIX = "policy."
TRAIN_PREFIX = "train."


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or not a cfgrl_ros checkpoint."""


@dataclasses.dataclass
class Checkpoint:
    policy: CFGRLPolicy
    metadata: dict[str, str]
    train_state: dict[str, torch.Tensor]
    path: Path  # the file it was loaded from

    @property
    def config(self) -> PolicyConfig:
        return self.policy.config

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))


def code_version() -> str:
    """Package version plus the git commit of the source tree; where no .git travelled with the source (the
    lent GPU machine), CFGRL_CODE_VERSION as the caller set it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("CFGRL_CODE_VERSION") or cfgrl_ros.__version__
    return f"{cfgrl_ros.__version__}+{commit}" if commit else cfgrl_ros.__version__


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensors[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    policy: CFGRLPolicy,
    *,
    dataset_fingerprint: str = "",
    step: int = 0,
    train_state: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write atomically (temp file + rename), so an interrupted save never leaves a broken file."""
    path = Path(path)
    tensors = {POLICY_PREFIX + k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() and dtype else v.dtype)
               for k, v in policy.state_dict().items()}
    tensors.update({TRAIN_PREFIX + k: v.detach().cpu() for k, v in (train_state or {}).items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(policy.config.to_dict()),
        "goal_mode": policy.config.goal_mode,
        "dataset_fingerprint": dataset_fingerprint,
        "code_version": code_version(),
        "step": str(step),
        **(extra_metadata or {}),
        "sha256": _tensor_digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as written:  # on disk before the rename: a power cut leaves the old file or the new
            os.fsync(written.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


# What save_checkpoint writes itself; everything else in the metadata is the caller's.
_OWN_METADATA = ("format", "config", "goal_mode", "dataset_fingerprint", "code_version", "step", "sha256")


def save_fp16_copy(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """The policy alone (no optimizer state), floats stored as float16: the few-MB form that is shipped as
    cfgrl_ros/data/default_policy.safetensors. It loads as float32 like any checkpoint; the metadata is kept,
    but for the code version, which becomes the running one's."""
    metadata = checkpoint.metadata
    overflowing = [k for k, v in checkpoint.policy.state_dict().items()
                   if v.is_floating_point() and not torch.isfinite(v.to(torch.float16)).all()]
    if overflowing:  # written anyway, the copy would load as "NaN or inf weights"
        raise CheckpointError(f"{checkpoint.path}: weights beyond float16's range (|x| > 65504) in "
                              f"{', '.join(overflowing[:3])}{', ...' if len(overflowing) > 3 else ''}; "
                              "keep this policy in float32")
    return save_checkpoint(path, checkpoint.policy, dataset_fingerprint=metadata.get("dataset_fingerprint", ""),
                           step=checkpoint.step, dtype=torch.float16,
                           extra_metadata={k: v for k, v in metadata.items() if k not in _OWN_METADATA})


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; any problem raises CheckpointError saying what and where."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:  # one open: a file replaced meanwhile is not mixed
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (corrupt or truncated?): {error}") from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cfgrl_ros checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("sha256") != _tensor_digest(tensors):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the SHA-256 recorded when it was saved")
    try:
        config = PolicyConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} has an invalid policy config: {error}") from error
    if not str(metadata.get("step", "0")).isdigit():
        raise CheckpointError(f"{path} has an invalid training step {metadata['step']!r} in its metadata")

    policy = CFGRLPolicy(config)
    weights = {k[len(POLICY_PREFIX):]: v.float() if v.is_floating_point() else v
               for k, v in tensors.items() if k.startswith(POLICY_PREFIX)}
    # Intact but unusable: a run that diverged saves NaN weights with a valid digest; every action would be NaN.
    broken = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path} holds NaN or inf weights ({', '.join(broken[:3])}"
                              f"{', ...' if len(broken) > 3 else ''}): did its training diverge?")
    try:
        policy.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match its own config: {error}") from error
    train_state = {k[len(TRAIN_PREFIX):]: v for k, v in tensors.items() if k.startswith(TRAIN_PREFIX)}
    return Checkpoint(policy.to(device).eval(), metadata, train_state, path)
