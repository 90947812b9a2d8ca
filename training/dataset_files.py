"""OGBench-format dataset files as the generator writes them: shards, a streaming merge, validation.

A shard is one np.savez_compressed file per chunk of episodes, written atomically. The merge streams
the shards' arrays key by key into one npz (never a whole array in memory), with fixed zip timestamps
so that the bytes depend only on the data, and can run in a thread while the shards are still being
produced (BackgroundMerge). Validation reads a merged file back in row chunks.
"""

import dataclasses
import os
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

Schema = dict[str, tuple[tuple[int, ...], np.dtype]]  # key -> (per-row shape, dtype), in file order


class DatasetFileError(RuntimeError):
    """A dataset or shard file cannot be written or read as the dataset's layout says."""


class CorruptShardError(DatasetFileError):
    """A shard file is truncated, corrupt or does not match the run's settings."""


class DatasetValidationError(DatasetFileError):
    """A merged dataset file fails validation."""


class MergeStopped(DatasetFileError):
    """The background merge was told to stop because production failed or was interrupted."""


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """What every file of one dataset holds: its arrays' per-row shapes and dtypes, and the episode length."""

    schema: Schema
    episode_length: int

    def num_rows(self, num_episodes: int) -> int:
        return num_episodes * self.episode_length


# ----------------------------------------------------------------------------------------------------
# Shards: atomic writes, full checks on reading.


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A compressed .npz written atomically: it either exists complete or not at all."""
    tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file behind


def load_shard(path: Path, layout: FileLayout, num_episodes: int) -> dict[str, np.ndarray]:
    """Read and fully check one shard; CorruptShardError names the file on any problem."""
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise CorruptShardError(f'shard {path} is corrupt or truncated ({type(err).__name__}: {err})') from err
    try:
        check_arrays(arrays, layout, num_episodes)
    except DatasetValidationError as err:
        raise CorruptShardError(f'shard {path} is invalid: {err}') from err
    return arrays


def check_arrays(arrays: dict[str, np.ndarray], layout: FileLayout, num_episodes: int) -> None:
    """Keys, shapes, dtypes, episode boundaries and finiteness."""
    schema, num_rows = layout.schema, layout.num_rows(num_episodes)
    if set(arrays) != set(schema):
        raise DatasetValidationError(f'keys {sorted(arrays)} != expected {sorted(schema)}')
    for key, (row_shape, dtype) in schema.items():
        check_shape_dtype(key, arrays[key].shape, arrays[key].dtype, (num_rows, *row_shape), dtype)
        if dtype.kind == 'f' and not np.isfinite(arrays[key]).all():
            raise DatasetValidationError(f'{key} has non-finite values')
    check_terminals(arrays['terminals'], layout.episode_length)


def check_shape_dtype(key: str, shape: tuple, dtype: np.dtype, want_shape: tuple, want_dtype: np.dtype) -> None:
    if tuple(shape) != tuple(want_shape) or np.dtype(dtype) != want_dtype:
        raise DatasetValidationError(f'{key}: got {dtype} {tuple(shape)}, expected {want_dtype} {tuple(want_shape)}')


def check_terminals(terminals: np.ndarray, episode_length: int, first_row: int = 0) -> None:
    """Terminals are True exactly on each episode's last row (rows counted from first_row)."""
    expected = ((np.arange(len(terminals)) + first_row) % episode_length) == episode_length - 1
    if not np.array_equal(terminals, expected):
        row = first_row + int(np.flatnonzero(terminals != expected)[0])
        raise DatasetValidationError(
            f'terminals must be True exactly on every {episode_length}-th row; first mismatch at row {row}'
        )


# ----------------------------------------------------------------------------------------------------
# Streaming npz writer and readers (deterministic bytes: fixed zip timestamps), merge, validation.

ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def write_npz_streaming(
    path: Path, entries: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], Iterable[np.ndarray]]]]
) -> None:
    """Write an np.load-compatible compressed npz whose arrays arrive in chunks (never whole in memory)."""
    tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
    try:
        _write_npz_entries(tmp, entries)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_npz_entries(
    tmp: Path, entries: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], Iterable[np.ndarray]]]]
) -> None:
    with zipfile.ZipFile(tmp, 'w', allowZip64=True) as archive:
        for key, (shape, dtype, chunks) in entries.items():
            info = zipfile.ZipInfo(f'{key}.npy', date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, 'w', force_zip64=True) as f:
                header = {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False, 'shape': shape}
                np.lib.format.write_array_header_1_0(f, header)
                written = 0
                for chunk in chunks():
                    chunk = np.ascontiguousarray(chunk)
                    if chunk.dtype != dtype or chunk.shape[1:] != shape[1:]:
                        raise DatasetFileError(f'{key}: chunk {chunk.dtype} {chunk.shape} does not fit {dtype} {shape}')
                    f.write(chunk.data)
                    written += len(chunk)
                if written != shape[0]:
                    raise DatasetFileError(f'{key}: wrote {written} rows, header says {shape[0]}')


def read_npz_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(f'{key}.npy') as f:
        return _read_header(f)


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise DatasetValidationError(f'unsupported .npy format version {version}')
    shape, fortran_order, dtype = read_header[version](f)
    if fortran_order:
        raise DatasetValidationError('Fortran-ordered arrays are not supported')
    return shape, dtype


def iter_npz_rows(archive: zipfile.ZipFile, key: str, rows_per_chunk: int = 4096) -> Iterator[np.ndarray]:
    """Stream an array out of an npz in row chunks (decompressing as it goes; the CRC is checked at the end)."""
    with archive.open(f'{key}.npy') as f:
        shape, dtype = _read_header(f)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        remaining = shape[0]
        while remaining:
            n = min(rows_per_chunk, remaining)
            buffer = f.read(n * row_bytes)
            if len(buffer) != n * row_bytes:
                raise DatasetValidationError(f'{key}: data ends {remaining} rows early')
            yield np.frombuffer(buffer, dtype=dtype).reshape(n, *shape[1:])
            remaining -= n
        if f.read(1):
            raise DatasetValidationError(f'{key}: data continues past the {shape[0]} rows in its header')


def merge_shards(
    layout: FileLayout,
    shard_paths: list[Path],
    num_episodes: int,
    out_path: Path,
    wait_for: Callable[[Path], None] | None = None,
) -> None:
    """Stream the shards' arrays (num_episodes in all), key by key and in order, into one OGBench-format file;
    wait_for(path), if given, returns once that shard exists (shards appear atomically: one that exists is
    complete)."""

    def chunks_of(key):
        def chunks():
            for path in shard_paths:
                if wait_for is not None:
                    wait_for(path)
                try:
                    with np.load(path) as npz:
                        yield npz[key]
                except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
                    raise CorruptShardError(f'shard {path} is corrupt or truncated ({err})') from err

        return chunks

    num_rows = layout.num_rows(num_episodes)
    entries = {key: ((num_rows, *row_shape), dtype, chunks_of(key)) for key, (row_shape, dtype) in layout.schema.items()}
    write_npz_streaming(out_path, entries)


class BackgroundMerge:
    """merge_shards in a thread, started before the shards exist: production and merging overlap.

    Used as a context manager around production. Leaving it normally means production is over: a shard that
    is still missing then is an error, not something to wait for. Leaving it by an exception stops the merge
    (its temporary file is removed). Either way it waits for the thread and re-raises the merge's own error.
    """

    POLL_S = 0.2

    def __init__(self, layout: FileLayout, shard_paths: list[Path], num_episodes: int, out_path: Path):
        self._produced, self._stop = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(layout, shard_paths, num_episodes, out_path),
                                        name=f'merge {out_path.name}', daemon=True)

    def __enter__(self) -> 'BackgroundMerge':
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        (self._produced if exc_type is None else self._stop).set()
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def _run(self, layout: FileLayout, shard_paths: list[Path], num_episodes: int, out_path: Path) -> None:
        try:
            merge_shards(layout, shard_paths, num_episodes, out_path, wait_for=self._wait_for)
        except BaseException as err:  # handed to the main thread by __exit__
            self._error = err

    def _wait_for(self, path: Path) -> None:
        while not path.exists():
            if self._produced.is_set() and not path.exists():
                raise CorruptShardError(f'shard {path} is missing after production finished')
            if self._stop.wait(self.POLL_S):
                raise MergeStopped(f'merge into {path.parent} stopped: production did not finish')


def validate_dataset(path: Path, layout: FileLayout, num_episodes: int) -> None:
    """Check a merged file: keys, shapes, dtypes, episode boundaries, finite values, intact compression."""
    schema, num_rows = layout.schema, layout.num_rows(num_episodes)
    try:
        with zipfile.ZipFile(path) as archive:
            keys = sorted(name.removesuffix('.npy') for name in archive.namelist())
            if keys != sorted(schema):
                raise DatasetValidationError(f'keys {keys} != expected {sorted(schema)}')
            for key, (row_shape, dtype) in schema.items():
                shape, got_dtype = read_npz_header(archive, key)
                check_shape_dtype(key, shape, got_dtype, (num_rows, *row_shape), dtype)
                checked_rows = 0
                for chunk in iter_npz_rows(archive, key):
                    if dtype.kind == 'f' and not np.isfinite(chunk).all():
                        raise DatasetValidationError(f'{key} has non-finite values')
                    if key == 'terminals':
                        check_terminals(chunk, layout.episode_length, first_row=checked_rows)
                    checked_rows += len(chunk)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetValidationError(f'{path} is corrupt or truncated ({type(err).__name__}: {err})') from err
    except DatasetValidationError as err:
        raise DatasetValidationError(f'{path}: {err}') from err

