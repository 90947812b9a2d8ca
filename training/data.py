"""OGBench-format offline datasets and goal-conditioned training batches.

Files: `<name>.npz` (train) and `<name>-val.npz` (validation) in OGBench's compact layout:
observations (N,H,W,3) uint8, actions (N,A) float, terminals (N,) (true on each episode's last row),
optional qpos, qvel, button_states and oracle_reps (N,G) (goal vectors, the paper's `-oraclerep`).
`valids` and the compact `terminals` are computed exactly as `ogbench.load_dataset(...,
compact_dataset=True)` does: an episode's last row has no next state, so it is never sampled.
A file saved from that function's output (with its `valids`) is read as it is; compact terminals
without `valids`, or a file with `next_observations` (the transition form), are refused, since
compacting them again would shift every episode boundary by a row.

Memory: `np.load` on a compressed npz decompresses a member into RAM on every access. Instead the
`observations` member (itself a .npy file) is streamed once, in chunks, into an uncompressed .npy
cache next to the dataset (or in `cache_dir`), named by the source's size and mtime, and opened
with mmap_mode='r': the OS page cache holds it at most once, and a dataset bigger than RAM still
works. A stale cache is replaced; concurrent loaders (DDP ranks) wait on a lock for one extraction.
Small arrays load normally. No next_observations copy is ever built.

Goals follow the CFGRL reference code (OGBench GCDataset.sample_goals, p_trajgoal=1, uniform):
goal = round(min(i+1, end) * d + end * (1-d)), d ~ U[0,1), with `end` the first compact terminal at
or after i, i.e. the last *valid* row of i's episode: like the reference, the invalid final row is
never a goal, and the last valid row is its own goal.

Augmentation (reference: random crop of the edge-padded image): one coin per batch with p_aug; when
it lands every sample gets its own offset, shared by its observation and its image goal, as in the
reference. On CUDA the uint8 images are uploaded once when they fit, so sampling, gathering and
augmentation run on the GPU; otherwise rows are gathered from the memmap into pinned memory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REQUIRED_KEYS = ("observations", "actions", "terminals")
OPTIONAL_KEYS = ("qpos", "qvel", "button_states", "oracle_reps")
GOAL_MODES = ("oracle", "image")
_MIB = 1 << 20


class DatasetError(ValueError):
    """A dataset file is missing, corrupt or malformed; the message names the file and the problem."""


@dataclasses.dataclass
class OfflineDataset:
    path: Path
    observations: np.ndarray  # (N,H,W,3) uint8, read-only memmap of the cache file
    actions: np.ndarray  # (N,A) float32
    terminals: np.ndarray  # (N,) float32, OGBench's compact form
    valids: np.ndarray  # (N,) float32, 0 on each episode's last row
    qpos: np.ndarray | None = None
    qvel: np.ndarray | None = None
    button_states: np.ndarray | None = None
    oracle_reps: np.ndarray | None = None  # (N,G) float32
    env_name: str | None = None  # lets oracle goals be computed from qpos when oracle_reps is absent

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def goal_dim(self, goal_mode: str) -> int:
        """Length of an oracle goal vector; 0 for image goals (they have no vector length)."""
        return self.goal_vectors().shape[1] if goal_mode == "oracle" else 0

    def goal_vectors(self) -> np.ndarray:
        """oracle_reps, computed from qpos by training/oracle_goals.py when the file has none."""
        if self.oracle_reps is None:
            self.oracle_reps = _compute_oracle_reps(self)
        return self.oracle_reps


def val_path_for(path: str | os.PathLike) -> Path:
    """`<name>.npz` -> `<name>-val.npz`, OGBench's naming."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DatasetError(f"{path}: expected a .npz dataset file")
    return path.with_name(path.stem + "-val.npz")


def load_dataset_pair(
    path: str | os.PathLike, *, env_name: str | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[OfflineDataset, OfflineDataset]:
    """Load `<name>.npz` and its `<name>-val.npz`."""
    train_path, val_path = Path(path), val_path_for(path)
    if not train_path.is_file():
        raise DatasetError(f"{train_path}: dataset file not found")
    if not val_path.is_file():
        raise DatasetError(f"{train_path}: validation split not found (looked for {val_path})")
    train_data = load_dataset(train_path, env_name=env_name, cache_dir=cache_dir)
    val_data = load_dataset(val_path, env_name=env_name, cache_dir=cache_dir)
    _check_same_layout(train_data, val_data)
    return train_data, val_data


def _check_same_layout(train: OfflineDataset, val: OfflineDataset) -> None:
    """The splits must fit one policy: found now, not at the first validation after hours of training."""
    shapes = {
        "observations": (train.observations.shape[1:], val.observations.shape[1:]),
        "actions": (train.actions.shape[1:], val.actions.shape[1:]),
    }
    if train.oracle_reps is not None or val.oracle_reps is not None:
        shapes["oracle_reps"] = tuple(None if d.oracle_reps is None else d.oracle_reps.shape[1:] for d in (train, val))
    for key, (ours, theirs) in shapes.items():
        if ours != theirs:
            raise DatasetError(f"{val.path}: {key} per row {theirs} differ from the training split's {ours} "
                               f"({train.path})")


def load_dataset(
    path: str | os.PathLike, *, env_name: str | None = None, cache_dir: str | os.PathLike | None = None
) -> OfflineDataset:
    """Load one OGBench-format .npz file in compact form; observations come back as a memmap."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {name.removesuffix(".npy") for name in archive.namelist()}
            missing = [key for key in REQUIRED_KEYS if key not in keys]
            if missing:
                raise DatasetError(f"{path}: missing keys {missing} (found {sorted(keys)})")
            num_rows = _check_observations_header(path, archive)
            if "next_observations" in keys:
                raise DatasetError(f"{path}: holds next_observations, so it was saved from "
                                   "ogbench.load_dataset(compact_dataset=False), whose rows are transitions with "
                                   "each episode's last state removed; use the original file")
            arrays = {key: _read_member(archive, key)
                      for key in (*REQUIRED_KEYS[1:], *OPTIONAL_KEYS, "valids") if key in keys}
            _validate(path, num_rows, arrays)
            cache = _observations_cache(path, archive, cache_dir)
        observations = np.load(cache, mmap_mode="r")  # a header that claims more rows than stored fails here
    except DatasetError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as error:  # ValueError: bad .npy content
        raise DatasetError(f"{path}: not a readable .npz archive (corrupt or truncated?): {error}") from error
    if "valids" in arrays:  # saved from ogbench.load_dataset(compact_dataset=True): already compact
        terminals, valids = arrays["terminals"].astype(np.float32), arrays["valids"].astype(np.float32)
    else:
        terminals, valids = compact_terminals(arrays["terminals"])
    optional = {key: arrays[key] for key in OPTIONAL_KEYS if key in arrays}
    if "oracle_reps" in optional:
        optional["oracle_reps"] = optional["oracle_reps"].astype(np.float32, copy=False)
    return OfflineDataset(
        path=path,
        observations=observations,
        actions=arrays["actions"].astype(np.float32, copy=False),
        terminals=terminals,
        valids=valids,
        env_name=env_name,
        **optional,
    )


def compact_terminals(terminals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(terminals, valids) exactly as ogbench.load_dataset(compact_dataset=True) makes them: the row
    before each episode end becomes terminal too, and each episode's last row is invalid (it has no
    next observation)."""
    terminals = terminals.astype(np.float32)
    next_terminals = np.concatenate([terminals[1:], [1.0]])
    return np.minimum(terminals + next_terminals, 1.0).astype(np.float32), 1.0 - terminals


def _check_observations_header(path: Path, archive: zipfile.ZipFile) -> int:
    """Check dtype and shape from the .npy header alone, before anything is decompressed."""
    with archive.open("observations.npy") as stream:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise DatasetError(f"{path}: observations use unsupported .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2] or fortran_order:
        raise DatasetError(
            f"{path}: observations must be a C-ordered uint8 (N,S,S,3) array of square images, got {dtype} {shape}"
            + (" in Fortran order" if fortran_order else "")
        )
    if shape[0] == 0:
        raise DatasetError(f"{path}: the dataset has no rows")
    return shape[0]


def _read_member(archive: zipfile.ZipFile, key: str) -> np.ndarray:
    with archive.open(key + ".npy") as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def _validate(path: Path, num_rows: int, arrays: dict[str, np.ndarray]) -> None:
    for key, array in arrays.items():
        if array.ndim == 0 or len(array) != num_rows:
            raise DatasetError(f"{path}: '{key}' has shape {array.shape} but observations have {num_rows} rows")
    for key in ("actions", "oracle_reps"):
        array = arrays.get(key)
        if array is not None and (array.ndim != 2 or array.dtype.kind != "f"):
            raise DatasetError(f"{path}: {key} must be a float (N,D) array, got {array.dtype} {array.shape}")
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, which is the point
            finite = None if array is None else np.isfinite(array.astype(np.float32, copy=False))  # as training reads it
        if finite is not None and not finite.all():
            bad_rows = np.flatnonzero(~finite.all(axis=1))
            raise DatasetError(f"{path}: {key} hold NaN/inf (as float32) in {len(bad_rows)} rows "
                               f"(first: row {bad_rows[0]})")
    actions = arrays["actions"]
    if np.abs(actions).max() > 1.0 + 1e-6:  # the sampler clips to [-1, 1]: such targets could never be met
        row = int(np.flatnonzero((np.abs(actions) > 1.0 + 1e-6).any(axis=1))[0])
        raise DatasetError(f"{path}: actions must lie in [-1, 1] (the policy's output range; OGBench's do), "
                           f"got {actions[row].tolist()} at row {row}: rescale them")
    terminals = arrays["terminals"]
    if terminals.ndim != 1 or not np.isin(terminals, (0, 1)).all():
        raise DatasetError(f"{path}: terminals must be a 0/1 (N,) array, got {terminals.dtype} {terminals.shape}")
    if not terminals[-1]:
        raise DatasetError(f"{path}: the last row is not marked terminal (no episode boundary at the end; truncated?)")
    if "valids" in arrays:
        _check_compact(path, terminals, arrays["valids"])
        return
    (pairs,) = np.nonzero(terminals[:-1].astype(bool) & terminals[1:].astype(bool))
    if len(pairs):  # loading would compact them a second time, shifting every goal and validity by a row
        raise DatasetError(
            f"{path}: rows {pairs[0]} and {pairs[0] + 1} are both terminal ({len(pairs)} such pairs): either an "
            "episode of one row, which has no transition (drop it), or terminals already in compact form, "
            "saved from ogbench.load_dataset(compact_dataset=True) without its 'valids' (save the original "
            "terminals, true only on each episode's last row, or the valids with them)")


def _check_compact(path: Path, terminals: np.ndarray, valids: np.ndarray) -> None:
    """A saved compact dataset must be what compacting its original terminals (1 - valids) gives."""
    if valids.shape != terminals.shape or not np.isin(valids, (0, 1)).all():
        raise DatasetError(f"{path}: valids must be a 0/1 (N,) array like terminals, got {valids.dtype} {valids.shape}")
    expected, _ = compact_terminals(1.0 - valids.astype(np.float32))
    if not np.array_equal(terminals.astype(np.float32), expected):
        row = int(np.flatnonzero(terminals != expected)[0])
        raise DatasetError(f"{path}: terminals and valids disagree at row {row}: a compact dataset's terminals "
                           "mark each episode's last two rows and valids is 0 on its last row only")


def _observations_cache(path: Path, archive: zipfile.ZipFile, cache_dir: str | os.PathLike | None) -> Path:
    """Decompress the observations member once into `<stem>.observations.<where>-<crc>-<size>-<mtime>.npy`.

    <where> hashes the file's resolved path and <crc> is the member's CRC-32 from the zip directory, so two
    datasets of one name and size sharing a cache directory never read each other's images.
    """
    stat = path.stat()
    directory = Path(cache_dir) if cache_dir is not None else path.parent
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    crc = archive.getinfo("observations.npy").CRC
    prefix = f"{path.stem}.observations.{where}-"
    cache = directory / f"{prefix}{crc:08x}-{stat.st_size}-{stat.st_mtime_ns}.npy"
    if cache.is_file():
        return cache
    partial = cache.with_name(cache.name + ".partial")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"{path.stem}.observations.{where}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be extracting the same file
            if cache.is_file():
                return cache
            info = archive.getinfo("observations.npy")
            progress = tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"decompressing {path.name}",
                            disable=info.file_size < 256 * _MIB)
            with archive.open(info) as source, open(partial, "wb") as target, progress:
                while chunk := source.read(16 * _MIB):
                    target.write(chunk)
                    progress.update(len(chunk))
            os.replace(partial, cache)  # atomic: a killed extraction never leaves a half cache
            for stale in directory.glob(f"{prefix}*.npy"):  # this file's older caches only
                if stale != cache:
                    stale.unlink()
    except OSError as error:
        raise DatasetError(f"{path}: cannot write the observation cache in {directory} "
                           f"(pass cache_dir= to put it elsewhere): {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return cache


def dataset_fingerprint(path: str | os.PathLike) -> str:
    """Cheap stable SHA-256 of `<name>.npz` and `<name>-val.npz` for checkpoints to record.

    Covers each file's size, its first and last MiB, and every member's name, size and CRC-32 from
    the zip directory (a CRC of the whole uncompressed content, so any change in the data shows).
    """
    digest = hashlib.sha256()
    for file in (Path(path), val_path_for(path)):
        if not file.is_file():
            raise DatasetError(f"{file}: dataset file not found")
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as stream:
            digest.update(stream.read(_MIB))
            stream.seek(max(size - _MIB, 0))
            digest.update(stream.read(_MIB))
        try:
            with zipfile.ZipFile(file) as archive:
                members = sorted((info.filename, info.file_size, info.CRC) for info in archive.infolist())
        except zipfile.BadZipFile as error:
            raise DatasetError(f"{file}: not a readable .npz archive: {error}") from error
        digest.update(repr(members).encode())
    return digest.hexdigest()


def goal_end_indices(terminals: np.ndarray) -> np.ndarray:
    """Per row, the last row its goal may come from: the first compact terminal at or after it."""
    (terminal_locs,) = np.nonzero(terminals > 0)
    return terminal_locs[np.searchsorted(terminal_locs, np.arange(len(terminals)))]


def future_goal_indices(idxs: torch.Tensor, ends: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform future goals in [min(i+1, end), end], exactly the reference's rounding (half to even)."""
    distances = torch.rand(idxs.shape, generator=generator, device=idxs.device, dtype=torch.float64)
    return torch.round(torch.minimum(idxs + 1, ends) * distances + ends * (1 - distances)).long()


def shift_images(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop (B,H,W,C) images at `offsets` (B,2) = (row, col) in [0, 2*pad] of their edge-padded copy.

    Edge padding repeats border pixels, so padded[y + dy, x + dx] == image[clamp(y + dy - pad),
    clamp(x + dx - pad)]: one gather, no padded copy and no loop over samples.
    """
    batch, height, width, _ = images.shape
    rows = (torch.arange(height, device=images.device) + offsets[:, :1] - pad).clamp(0, height - 1)
    cols = (torch.arange(width, device=images.device) + offsets[:, 1:] - pad).clamp(0, width - 1)
    samples = torch.arange(batch, device=images.device)[:, None, None]
    return images[samples, rows[:, :, None], cols[:, None, :]]


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random shift augmentation: pad by `pad` px (edge mode) and crop back, one offset per sample."""
    offsets = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=generator, device=images.device)
    return shift_images(images, offsets, pad)


class GoalBatchSampler:
    """Samples {observations (B,H,W,3) uint8, actions (B,A) float32, goals} on `device`.

    goals: oracle_reps rows (B,G) float32 in "oracle" mode, observation images (B,H,W,3) uint8 in
    "image" mode. `on_device=None` uploads the images when `device` is CUDA and they fit in free
    memory minus `gpu_reserve_bytes`; on CPU it gathers from the memmap (True loads them into RAM).
    """

    def __init__(self, dataset: OfflineDataset, goal_mode: str, batch_size: int, device: str | torch.device = "cpu",
                 seed: int = 0, p_aug: float = 0.5, pad: int = 3, on_device: bool | None = None,
                 gpu_reserve_bytes: int = 8 << 30):
        if goal_mode not in GOAL_MODES:
            raise ValueError(f"goal_mode must be one of {GOAL_MODES}, got {goal_mode!r}")
        if batch_size < 1 or not 0.0 <= p_aug <= 1.0 or pad < 0:
            raise ValueError(f"need batch_size >= 1, 0 <= p_aug <= 1, pad >= 0; got {batch_size}, {p_aug}, {pad}")
        self.dataset, self.goal_mode, self.batch_size, self.p_aug, self.pad = dataset, goal_mode, batch_size, p_aug, pad
        self.device = torch.device(device)
        if on_device is None:
            on_device = self.device.type == "cuda" and _fits_on_gpu(dataset.observations.nbytes, self.device,
                                                                   gpu_reserve_bytes)
        self.on_device = on_device
        # Rows are drawn on the CPU whatever the device, so the batches of a seed do not depend on whether
        # the images fitted on the GPU (free memory differs between a run and its resumption).
        row_device = self.device if on_device else torch.device("cpu")  # where rows are gathered
        (valid_idxs,) = np.nonzero(dataset.valids > 0)
        if len(valid_idxs) == 0:
            raise DatasetError(f"{dataset.path}: no valid rows (every episode has a single row)")
        self._valid_idxs = torch.from_numpy(valid_idxs)
        self._ends = torch.from_numpy(goal_end_indices(dataset.terminals))
        self._actions = torch.from_numpy(dataset.actions).to(row_device)
        self._goal_vectors = (torch.from_numpy(dataset.goal_vectors()).to(row_device)
                              if goal_mode == "oracle" else None)
        self._images = _upload(dataset.observations, self.device) if on_device else None
        self._index_generator = torch.Generator()
        self.generator = torch.Generator(self.device)  # shift offsets; the training step may draw its noise here
        self._coin_generator = torch.Generator()  # on the CPU, so the per-batch coin never syncs a GPU
        self.reseed(seed)
        self._pinned: list[torch.Tensor] = []
        if self.device.type == "cuda" and not on_device:  # double buffer: fill one while the other uploads
            rows = batch_size * (2 if goal_mode == "image" else 1)
            shape = (rows, *dataset.observations.shape[1:])
            self._pinned = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
            self._uploaded = [torch.cuda.Event() for _ in range(2)]
            self._slot = 0

    @property
    def goal_shape(self) -> tuple[int, ...]:
        images = self.dataset.observations
        return tuple(images.shape[1:] if self._goal_vectors is None else self._goal_vectors.shape[1:])

    def reseed(self, seed: int) -> None:
        """Reset every generator, e.g. once per step so a resumed run replays the same batches."""
        self._index_generator.manual_seed(seed)
        self.generator.manual_seed(seed + 1)
        self._coin_generator.manual_seed(seed + 2)

    def sample_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform valid rows and their uniform future goal rows (CPU tensors)."""
        picks = torch.randint(len(self._valid_idxs), (self.batch_size,), generator=self._index_generator)
        idxs = self._valid_idxs[picks]
        return idxs, future_goal_indices(idxs, self._ends[idxs], self._index_generator)

    def sample(self, augment: bool = True) -> dict[str, torch.Tensor]:
        """One batch; `augment=False` (validation) skips the augmentation coin."""
        idxs, goal_idxs = self.sample_indices()
        if self.device.type == "cuda" and self.on_device:  # pinned, asynchronous: no wait on the GPU's queue
            idxs, goal_idxs = (i.pin_memory().to(self.device, non_blocking=True) for i in (idxs, goal_idxs))
        image_goals = self.goal_mode == "image"
        images = self._gather_images(torch.cat([idxs, goal_idxs]) if image_goals else idxs)
        if augment and torch.rand((), generator=self._coin_generator).item() < self.p_aug:
            offsets = torch.randint(0, 2 * self.pad + 1, (self.batch_size, 2), generator=self.generator,
                                    device=self.device)
            images = shift_images(images, offsets.repeat(2, 1) if image_goals else offsets, self.pad)
        goals = images[self.batch_size:] if image_goals else self._goal_vectors[goal_idxs]
        return {
            "observations": images[: self.batch_size],
            "actions": self._actions[idxs].to(self.device, non_blocking=True),
            "goals": goals.to(self.device, non_blocking=True),
        }

    def _gather_images(self, idxs: torch.Tensor) -> torch.Tensor:
        if self._images is not None:
            return self._images[idxs]
        rows = idxs.numpy()
        if not self._pinned:
            return torch.from_numpy(self.dataset.observations[rows])
        slot, self._slot = self._slot, 1 - self._slot
        self._uploaded[slot].synchronize()  # the copy that last read this buffer has finished
        buffer = self._pinned[slot][: len(rows)]
        np.take(self.dataset.observations, rows, axis=0, out=buffer.numpy(), mode="clip")  # "raise" would buffer
        images = buffer.to(self.device, non_blocking=True)
        self._uploaded[slot].record()
        return images


def _compute_oracle_reps(dataset: OfflineDataset) -> np.ndarray:
    hint = (f"{dataset.path} has no 'oracle_reps' for goal_mode='oracle': regenerate it with the dataset "
            "generator, or load it with env_name=... and qpos so training/oracle_goals.py computes them")
    if dataset.env_name is None or dataset.qpos is None:
        raise DatasetError(hint)
    try:
        from training.oracle_goals import oracle_goals
    except ModuleNotFoundError as error:
        if error.name != "training.oracle_goals":
            raise
        raise DatasetError(hint + " (that module is not available)") from error
    reps = np.asarray(oracle_goals(dataset.env_name, dataset.qpos, dataset.button_states), dtype=np.float32)
    if reps.ndim != 2 or len(reps) != len(dataset):
        raise DatasetError(f"{dataset.path}: oracle_goals returned shape {reps.shape}, expected ({len(dataset)}, G)")
    bad = ~np.isfinite(reps).all(axis=1)
    if bad.any():
        raise DatasetError(f"{dataset.path}: the oracle goals computed from qpos are NaN or inf in {int(bad.sum())} "
                           f"rows (first: {int(np.argmax(bad))}): the file's qpos is corrupt")
    return reps


def _fits_on_gpu(nbytes: int, device: torch.device, reserve_bytes: int) -> bool:
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return nbytes + reserve_bytes <= free_bytes


def _upload(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy the memmap to `device` in 256 MiB chunks, so host RAM never holds a second full copy."""
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    step = max(1, 256 * _MIB // max(1, images[0].nbytes))
    for start in tqdm(range(0, len(images), step), desc=f"uploading images to {device}", disable=len(images) <= step):
        out[start : start + step].copy_(torch.from_numpy(np.array(images[start : start + step])))
    return out
