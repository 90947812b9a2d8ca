"""Offline CFGRL training: flow matching with 10% goal dropout, nothing else.

    cfgrl-train --dataset data/visual-cube-single-play-v0.npz --goal-mode oracle --out runs/cube
    cfgrl-train --config config/train_visual_cube.yaml --steps 1000            # flags override YAML
    torchrun --nproc-per-node 4 -m training.train --dataset ...          # DistributedDataParallel

Every run directory holds checkpoint.safetensors (policy + optimizer, resumable with --resume),
metrics.csv and TensorBoard events. Seeding is per step (seed, step, rank), so a resumed run draws
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cfgrl_ros.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig
from training.data import DatasetError, GoalBatchSampler, dataset_fingerprint, load_dataset_pair
from training.oracle_goals import OracleGoalError


class TrainError(ValueError):
    """Training cannot start as asked (settings that do not fit, a checkpoint that is not this run's)."""


CHOICES = {"goal_mode": ("oracle", "image"), "goal_encoder": ("shared", "separate"), "precision": ("bf16", "fp32")}


@dataclasses.dataclass
class TrainConfig:
    dataset: str = ""
    env_name: str = ""  # lets oracle goals be computed from qpos when the file has no oracle_reps
    out: str = "runs/cfgrl"
    goal_mode: str = "oracle"
    goal_encoder: str = "shared"
    steps: int = 500_000
    batch_size: int = 256
    lr: float = 3e-4
    p_aug: float = 0.5
    condition_dropout: float = 0.1
    seed: int = 0
    device: str = "auto"
    log_every: int = 100
    val_every: int = 5_000
    val_batches: int = 8
    save_every: int = 10_000
    resume: bool = False
    compile: bool = False
    precision: str = "bf16"  # CUDA forward/loss under bf16 autocast, or fp32 (TF32 matmuls, as JAX's GPU default); CPU: fp32

    def __post_init__(self) -> None:
        """Types as declared (YAML reads `lr: 3e-4` as a string) and values a run can use, checked up front."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, _as_type(field.name, field.type, getattr(self, field.name)))
        problems = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, rule, ok in (
            ("steps", ">= 1", self.steps >= 1),
            ("batch_size", ">= 1", self.batch_size >= 1),
            ("lr", "finite and > 0", math.isfinite(self.lr) and self.lr > 0),
            ("p_aug", "within [0, 1]", 0 <= self.p_aug <= 1),
            ("condition_dropout", "within [0, 1)", 0 <= self.condition_dropout < 1),
            *((name, " or ".join(values), getattr(self, name) in values) for name, values in CHOICES.items()),
            *((name, ">= 1", getattr(self, name) >= 1) for name in ("log_every", "val_every", "val_batches",
                                                                     "save_every")),
        ) if not ok]
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as error:
                problems.append(f"device {self.device!r} is not a torch device ({error})")
        if problems:
            raise TrainError("; ".join(problems))


def _as_type(name: str, kind: str, value):
    """value as the field's type: ints from integral numbers or digits, floats from numbers or numeric text."""
    try:
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if kind == "bool" and isinstance(value, bool) or kind == "str" and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    raise TrainError(f"{name} must be {'a number' if kind == 'float' else 'an integer' if kind == 'int' else kind}, "
                     f"got {type(value).__name__} {value!r}")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat named tensors, for the safetensors checkpoint."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def step_seed(seed: int, step: int, rank: int) -> int:
    # GoalBatchSampler.reseed seeds three generators with s, s+1 and s+2: ranks 3 apart never share a stream.
    return (seed * 1_000_003 + step * 7_919 + rank * 3) % 2**63


# What a resumed run must share with the checkpoint to draw the batches an uninterrupted run would have
# (the policy config is compared on its own; steps and the logging cadence may change).
RESUME_KEYS = ("seed", "batch_size", "lr", "p_aug", "precision", "world_size")


def check_resumable(checkpoint: Checkpoint, policy_config: PolicyConfig, config: TrainConfig, fingerprint: str,
                    path: Path, world_size: int = 1) -> None:
    """Refuse to continue a run on other data, with another policy or other settings: the result would be neither run."""
    problems = [f"{field.name} {getattr(checkpoint.config, field.name)!r} != {getattr(policy_config, field.name)!r}"
                for field in dataclasses.fields(PolicyConfig)
                if getattr(checkpoint.config, field.name) != getattr(policy_config, field.name)]
    metadata = checkpoint.metadata
    if metadata.get("dataset_fingerprint") != fingerprint:
        problems.append(f"dataset fingerprint {metadata.get('dataset_fingerprint', '?')[:12]} != "
                        f"{fingerprint[:12]} of {config.dataset}")
    saved = json.loads(metadata.get("train_config", "{}"))
    saved.setdefault("world_size", 1)  # checkpoints from before it was recorded: single-process runs
    current = {**dataclasses.asdict(config), "world_size": world_size}
    problems += [f"{key} {saved.get(key)!r} != {current[key]!r}" for key in RESUME_KEYS if saved.get(key) != current[key]]
    if problems:
        raise TrainError(f"cannot resume {path}: it was trained with other data or settings (saved != given: "
                         f"{'; '.join(problems)}); resume with the saved ones, or start a new run in another --out")
    if checkpoint.step > config.steps:
        raise TrainError(f"cannot resume {path} to step {config.steps}: it is at step {checkpoint.step} already; "
                         "pass a larger --steps to train on")


class MetricsLog:
    """CSV + TensorBoard, written by rank 0 only.

    A run that starts at step 0 starts both logs afresh; a resumed one first drops what the interrupted
    run logged after its last checkpoint, which the resumed run logs again.
    """

    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.csv"
        header = ["step", "name", "value", "wall_time"]
        kept = []
        if start_step and self.path.exists():
            with open(self.path, newline="") as file:
                kept = [row for row in list(csv.reader(file))[1:] if row and int(row[0]) <= start_step]
        elif not start_step:
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        self.file = open(self.path, "w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerows([header, *kept])
        self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        for name, value in values.items():
            self.csv.writerow([step, name, f"{value:.6g}", f"{now:.3f}"])
            self.tensorboard.add_scalar(name, value, step)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()


def resolve_device(name: str, local_rank: int) -> torch.device:
    """`auto`: this process's GPU, else the CPU. A bare `cuda` also means this process's GPU (torchrun)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


@torch.no_grad()
def validation_loss(policy: CFGRLPolicy, sampler: GoalBatchSampler, batches: int, seed: int,
                    autocast: torch.autocast) -> float:
    """Mean flow loss on fixed validation batches (fixed seeds, no augmentation), at the training precision."""
    policy.eval()
    losses = []
    for i in range(batches):
        sampler.reseed(step_seed(seed, i, 0))
        batch = sampler.sample(augment=False)
        with autocast:
            losses.append(policy.flow_matching_loss(batch, sampler.generator).item())
    policy.train()
    return sum(losses) / len(losses)


def train(config: TrainConfig) -> Path:
    """Train (or resume) a policy; returns the checkpoint path."""
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank, local_rank, world = 0, 0, 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if config.batch_size % world:
        raise TrainError(f"batch size {config.batch_size} does not split over {world} processes")
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.safetensors"
    if checkpoint_path.exists() and not config.resume:
        raise TrainError(f"{checkpoint_path} exists: pass --resume to continue that run, or choose another --out")
    if config.condition_dropout == 0 and rank == 0:
        print("cfgrl-train: warning: condition_dropout 0 never trains the null goal: only w=1 will be meaningful",
              file=sys.stderr)

    train_data, val_data = load_dataset_pair(config.dataset, env_name=config.env_name or None)
    batch = config.batch_size // world
    sampler = GoalBatchSampler(train_data, config.goal_mode, batch, device, seed=config.seed, p_aug=config.p_aug)
    val_sampler = GoalBatchSampler(val_data, config.goal_mode, batch, device, seed=config.seed, p_aug=0.0)

    torch.manual_seed(config.seed)
    try:
        policy_config = PolicyConfig(
            action_dim=train_data.action_dim, goal_mode=config.goal_mode, goal_dim=train_data.goal_dim(config.goal_mode),
            image_size=train_data.observations.shape[1],
            goal_encoder=config.goal_encoder, condition_dropout=config.condition_dropout,
        )
    except ValueError as error:  # e.g. images whose size the encoder cannot take
        raise TrainError(f"no policy fits {config.dataset}: {error}") from None
    policy = CFGRLPolicy(policy_config).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, fused=device.type == "cuda")
    fingerprint = dataset_fingerprint(config.dataset)
    start_step = 0
    if config.resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path, device)
        check_resumable(checkpoint, policy_config, config, fingerprint, checkpoint_path, world)
        policy.load_state_dict(checkpoint.policy.state_dict())
        load_optimizer_tensors(optimizer, {k: v.to(device) for k, v in checkpoint.train_state.items()})
        start_step = checkpoint.step
    model: torch.nn.Module = policy
    if distributed:
        model = DistributedDataParallel(policy, device_ids=[local_rank] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    metadata = {"train_config": json.dumps({**dataclasses.asdict(config), "world_size": world})}

    def save(step: int) -> None:
        # Diverged weights never replace the last good checkpoint (the loss is checked only when logged).
        if not all(torch.isfinite(p).all() for p in policy.parameters()):
            raise FloatingPointError(f"the weights became NaN or inf by step {step}; the last good checkpoint "
                                     f"is kept: {checkpoint_path}")
        if rank == 0:
            save_checkpoint(checkpoint_path, policy, dataset_fingerprint=fingerprint, step=step,
                            train_state=optimizer_tensors(optimizer), extra_metadata=metadata)

    bf16 = device.type == "cuda" and config.precision == "bf16"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        in_effect = f"# ran on {device} x {world} process(es), in {'bf16 autocast' if bf16 else 'fp32'}\n"
        (out / "train_config.yaml").write_text(in_effect + yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    log = MetricsLog(out, start_step) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    progress = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
                    disable=rank != 0, desc="train", unit="step", dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), start_step
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
    policy.train()
    for step in progress:
        sampler.reseed(step_seed(config.seed, step, rank))
        batch = sampler.sample()
        with autocast:
            loss = model(batch, sampler.generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().float()

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            if distributed:  # the mean over every rank's batches, and every rank stops together on a NaN
                dist.all_reduce(loss_sum)
                loss_sum /= world
            loss_value = loss_sum.item() / (done - last_step)  # the mean since the last log; NaN if any was
            loss_sum.zero_()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} by step {done}; last checkpoint: {checkpoint_path}")
            now = time.perf_counter()
            rate = (done - last_step) / (now - last_time)
            last_time, last_step = now, done
            progress.set_postfix(loss=f"{loss_value:.4f}", steps_s=f"{rate:.1f}")
            if log:
                log.log(done, {"train/loss": loss_value, "train/steps_per_s": rate})
        if done % config.val_every == 0 or done == config.steps:
            value = validation_loss(policy, val_sampler, config.val_batches, config.seed, autocast)
            if log:
                log.log(done, {"val/loss": value})
                progress.write(f"step {done}: val loss {value:.4f}")
        if done % config.save_every == 0 or done == config.steps:
            save(done)
    if start_step == config.steps and rank == 0:
        print(f"cfgrl-train: {checkpoint_path} is at step {start_step} = --steps already: nothing to train",
              file=sys.stderr)
    if log:
        log.close()
    if distributed:
        dist.destroy_process_group()
    return checkpoint_path


FLAG_HELP = {  # what each TrainConfig field means on the command line; its default is appended
    "dataset": "<name>.npz, with <name>-val.npz beside it (required)",
    "env_name": "OGBench env (e.g. cube-single) to compute oracle goals from qpos when the file has no oracle_reps",
    "out": "run directory: checkpoint.safetensors, metrics.csv, TensorBoard events",
    "goal_mode": "oracle: OGBench's low-dimensional goals (as in the paper); image: goal frames",
    "goal_encoder": "image goals: share the observation encoder, or train a separate one",
    "steps": "gradient steps in total (a resumed run continues up to this)",
    "batch_size": "samples per step, split over the torchrun processes",
    "lr": "Adam learning rate",
    "p_aug": "probability that a batch gets random-shift augmentation (one coin per batch, as the reference)",
    "condition_dropout": "fraction of goals replaced by the learned null embedding (CFGRL: 0.1)",
    "seed": "seeds the model and every step's batch",
    "device": "auto (CUDA if present, else CPU), or a torch device such as cuda:1",
    "log_every": "steps between training-loss rows in metrics.csv",
    "val_every": "steps between validation losses",
    "val_batches": "validation batches per evaluation",
    "save_every": "steps between checkpoints",
    "resume": "continue the run in --out from its checkpoint",
    "compile": "torch.compile the network",
    "precision": "bf16 autocast or fp32 (TF32) on CUDA; CPU always trains in fp32",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfgrl-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of TrainConfig fields; flags given on the command line win")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = FLAG_HELP[field.name] + ("" if field.default == "" or field.default is False else f" (default: {field.default})")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(field.type, str), default=None,
                                choices=CHOICES.get(field.name), help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values: dict = {}
    if args.config:
        try:
            values = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SystemExit(f"cfgrl-train: error: cannot read --config {args.config}: {error}") from None
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise SystemExit(f"{args.config}: unknown training options {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    try:
        config = TrainConfig(**values)
    except TrainError as error:
        raise SystemExit(f"cfgrl-train: error: {error}") from None
    if not config.dataset:
        raise SystemExit("--dataset is required (a path to <name>.npz with <name>-val.npz beside it)")
    return config


def main(argv: list[str] | None = None) -> None:
    try:
        checkpoint = train(parse_config(argv))
    except (TrainError, DatasetError, CheckpointError, OracleGoalError, OSError, FloatingPointError) as error:
        raise SystemExit(f"cfgrl-train: error: {error}") from None
    print(f"checkpoint: {checkpoint}")


if __name__ == "__main__":
    main()
