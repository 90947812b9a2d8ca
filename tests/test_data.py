"""Tests for training/data.py on tiny OGBench-format files written to tmp_path (CPU, fast)."""

import os
import shutil
from pathlib import Path

import numpy as np
import ogbench
import pytest
import torch

from training.data import (
    DatasetError,
    GoalBatchSampler,
    dataset_fingerprint,
    future_goal_indices,
    goal_end_indices,
    load_dataset,
    load_dataset_pair,
    random_shift,
    shift_images,
)

EPISODES = (6, 9, 2, 5)


def make_arrays(lengths=EPISODES, seed=0, image_size=16, oracle=True):
    rng = np.random.default_rng(seed)
    rows = sum(lengths)
    terminals = np.zeros(rows, dtype=bool)
    terminals[np.cumsum(lengths) - 1] = True
    arrays = dict(
        observations=rng.integers(0, 256, (rows, image_size, image_size, 3), dtype=np.uint8),
        actions=rng.uniform(-1, 1, (rows, 5)).astype(np.float32),
        terminals=terminals,
        qpos=rng.normal(size=(rows, 21)).astype(np.float32),
        qvel=rng.normal(size=(rows, 20)).astype(np.float32),
        button_states=rng.integers(0, 2, (rows, 2)),  # int64, as OGBench's own generator stores them
    )
    if oracle:
        arrays["oracle_reps"] = rng.normal(size=(rows, 3)).astype(np.float32)
    return arrays


def write_pair(tmp_path, name="tiny-play-v0", save=np.savez_compressed, **kwargs):
    train = tmp_path / f"{name}.npz"
    save(train, **make_arrays(**kwargs))
    save(tmp_path / f"{name}-val.npz", **make_arrays(lengths=(4, 3), seed=1, **kwargs))
    return train


def episode_ids(lengths):
    return np.repeat(np.arange(len(lengths)), lengths)


# --- loading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", [np.savez_compressed, np.savez])
def test_loads_train_and_val_like_ogbench(tmp_path, save):
    train_path = write_pair(tmp_path, save=save)
    train, val = load_dataset_pair(train_path)
    for ours, path in ((train, train_path), (val, tmp_path / "tiny-play-v0-val.npz")):
        ref = ogbench.load_dataset(str(path), ob_dtype=np.uint8, compact_dataset=True, add_info=True)
        assert isinstance(ours.observations, np.memmap)
        np.testing.assert_array_equal(ours.observations, ref["observations"])
        np.testing.assert_array_equal(ours.actions, ref["actions"])
        np.testing.assert_array_equal(ours.valids, ref["valids"])
        np.testing.assert_array_equal(ours.terminals, ref["terminals"])
        assert ours.valids.dtype == ref["valids"].dtype and ours.terminals.dtype == ref["terminals"].dtype
        for key in ("qpos", "qvel", "button_states"):
            np.testing.assert_array_equal(getattr(ours, key), ref[key])
        assert ours.oracle_reps.dtype == np.float32
    assert len(train) == sum(EPISODES) and len(val) == 7


def test_goal_end_indices_are_last_valid_rows():
    terminals = np.zeros(sum(EPISODES), dtype=bool)
    terminals[np.cumsum(EPISODES) - 1] = True
    compact = np.minimum(terminals + np.concatenate([terminals[1:], [True]]), 1)
    last_valid = (np.cumsum(EPISODES) - 2)[episode_ids(EPISODES)]
    np.testing.assert_array_equal(goal_end_indices(compact)[terminals == 0], last_valid[terminals == 0])


# --- goal sampling -------------------------------------------------------------------------------

def test_goals_stay_in_their_episode_and_in_the_future(tmp_path):
    dataset = load_dataset(write_pair(tmp_path))
    sampler = GoalBatchSampler(dataset, "oracle", batch_size=4096, seed=3)
    episode = episode_ids(EPISODES)
    last_valid = (np.cumsum(EPISODES) - 2)[episode]
    for _ in range(5):
        idxs, goals = (t.numpy() for t in sampler.sample_indices())
        assert dataset.valids[idxs].all()
        assert (episode[goals] == episode[idxs]).all()
        assert (goals <= last_valid[idxs]).all()
        # strictly in the future, except at the last valid row, which is its own goal
        assert ((goals > idxs) | ((goals == idxs) & (idxs == last_valid[idxs]))).all()
        assert (goals == idxs).any() and (goals == last_valid[idxs]).any()


def test_future_goals_are_uniform_over_the_future():
    generator = torch.Generator().manual_seed(0)
    count, end = 200_000, torch.tensor(10)
    goals = future_goal_indices(torch.zeros(count, dtype=torch.long), end.expand(count), generator)
    frequencies = torch.bincount(goals, minlength=11).double() / count
    # round(U[1, 10]) gives the 8 inner steps 1/9 each and the two ends 1/18 each (the reference formula)
    expected = torch.tensor([0] + [1 / 18] + [1 / 9] * 8 + [1 / 18], dtype=torch.float64)
    assert torch.allclose(frequencies, expected, atol=0.004)  # ~5 sigma at this count

    idxs = torch.randint(0, 500, (count,), generator=generator)
    ends = torch.full((count,), 700)
    relative = (future_goal_indices(idxs, ends, generator) - idxs).double() / (ends - idxs).double()
    assert abs(relative.mean().item() - 0.5) < 0.01


def test_batches_hold_the_sampled_rows(tmp_path):
    dataset = load_dataset(write_pair(tmp_path))
    for mode in ("oracle", "image"):
        batch = GoalBatchSampler(dataset, mode, batch_size=32, seed=5, p_aug=0.0).sample()
        idxs, goals = GoalBatchSampler(dataset, mode, batch_size=32, seed=5).sample_indices()
        np.testing.assert_array_equal(batch["observations"].numpy(), dataset.observations[idxs.numpy()])
        np.testing.assert_array_equal(batch["actions"].numpy(), dataset.actions[idxs.numpy()])
        source = dataset.oracle_reps if mode == "oracle" else dataset.observations
        np.testing.assert_array_equal(batch["goals"].numpy(), source[goals.numpy()])
        assert batch["observations"].dtype == torch.uint8 and batch["observations"].shape == (32, 16, 16, 3)
        assert batch["actions"].dtype == torch.float32 and batch["actions"].shape == (32, 5)
        expected_goal = (torch.float32, (32, 3)) if mode == "oracle" else (torch.uint8, (32, 16, 16, 3))
        assert (batch["goals"].dtype, tuple(batch["goals"].shape)) == expected_goal


def test_oracle_mode_without_oracle_reps_says_what_to_do(tmp_path):
    dataset = load_dataset(write_pair(tmp_path, oracle=False))
    with pytest.raises(DatasetError, match="no 'oracle_reps'.*regenerate"):
        GoalBatchSampler(dataset, "oracle", batch_size=4)
    assert GoalBatchSampler(dataset, "image", batch_size=4).sample()["goals"].dtype == torch.uint8


def test_oracle_goals_computed_from_a_corrupt_qpos_are_refused(tmp_path):
    path = write_pair(tmp_path, oracle=False)
    with np.load(path) as raw:
        arrays = dict(raw)
    arrays["qpos"][5, :] = np.nan
    np.savez_compressed(path, **arrays)
    dataset = load_dataset(path, env_name="visual-cube-single-v0")
    with pytest.raises(DatasetError, match="NaN or inf in 1 rows \\(first: 5\\)"):
        dataset.goal_vectors()


def test_oracle_reps_computed_from_qpos_when_env_is_known(tmp_path):
    from training.oracle_goals import oracle_goals

    dataset = load_dataset(write_pair(tmp_path, oracle=False), env_name="visual-cube-single-v0")
    assert dataset.goal_dim("oracle") == 3 and dataset.goal_dim("image") == 0 and dataset.action_dim == 5
    batch = GoalBatchSampler(dataset, "oracle", batch_size=16, seed=2).sample()
    _, goals = GoalBatchSampler(dataset, "oracle", batch_size=16, seed=2).sample_indices()
    expected = oracle_goals("visual-cube-single-v0", dataset.qpos, dataset.button_states)[goals.numpy()]
    np.testing.assert_array_equal(batch["goals"].numpy(), expected)


def test_reseed_replays_and_augment_false_never_shifts(tmp_path):
    dataset = load_dataset(write_pair(tmp_path))
    sampler = GoalBatchSampler(dataset, "image", batch_size=16, seed=0, p_aug=1.0)
    sampler.reseed(42)
    first = sampler.sample()
    noise = torch.rand(3, generator=sampler.generator)
    sampler.sample()
    sampler.reseed(42)
    again = sampler.sample()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert torch.equal(noise, torch.rand(3, generator=sampler.generator))
    sampler.reseed(42)
    idxs, goals = sampler.sample_indices()
    sampler.reseed(42)
    plain = sampler.sample(augment=False)
    np.testing.assert_array_equal(plain["observations"].numpy(), dataset.observations[idxs.numpy()])
    np.testing.assert_array_equal(plain["goals"].numpy(), dataset.observations[goals.numpy()])
    assert not torch.equal(plain["observations"], first["observations"])  # p_aug=1 did shift


def test_same_seed_same_batches_on_both_image_paths(tmp_path):
    dataset = load_dataset(write_pair(tmp_path))

    def batches(seed, on_device):
        sampler = GoalBatchSampler(dataset, "image", batch_size=16, seed=seed, on_device=on_device)
        return [sampler.sample() for _ in range(6)]

    first, preloaded, other = batches(7, False), batches(7, True), batches(8, False)
    for a, b in zip(first, preloaded):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert not all(torch.equal(a["observations"], c["observations"]) for a, c in zip(first, other))


# --- augmentation --------------------------------------------------------------------------------

def test_shift_matches_edge_pad_then_crop():
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [6, 6], [3, 3], [1, 5]])
    shifted = shift_images(images, offsets, pad=3)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    padded = np.pad(images.numpy(), ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    for k, (dy, dx) in enumerate(offsets.tolist()):
        np.testing.assert_array_equal(shifted[k].numpy(), padded[k, dy : dy + 64, dx : dx + 64])
    assert torch.equal(shifted[2], images[2])  # offset == pad is the identity
    # offset (0, 0) moves the image down-right by 3 and replicates its first row and column
    assert torch.equal(shifted[0, 3:, 3:], images[0, :-3, :-3])
    assert (shifted[0, :4, 3:] == images[0, :1, :-3]).all() and (shifted[0, 3:, :4] == images[0, :-3, :1]).all()


def test_random_shift_shapes_and_pad_zero_identity():
    images = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    out = random_shift(images, pad=3, generator=generator)
    assert out.shape == images.shape and out.dtype == torch.uint8 and not torch.equal(out, images)
    assert torch.equal(random_shift(images, pad=0, generator=generator), images)


def recover_offsets(raw, shifted, pad=3):
    """The one (row, col) offset per sample that turns `raw` into `shifted`."""
    side = 2 * pad + 1
    candidates = torch.cartesian_prod(torch.arange(side), torch.arange(side))
    trials = shift_images(raw.repeat_interleave(len(candidates), 0), candidates.repeat(len(raw), 1), pad)
    matches = (trials == shifted.repeat_interleave(len(candidates), 0)).flatten(1).all(1).view(len(raw), -1)
    assert (matches.sum(1) == 1).all()
    return candidates[matches.int().argmax(1)]


def test_about_half_the_batches_are_augmented_with_shared_obs_goal_offsets(tmp_path):
    dataset = load_dataset(write_pair(tmp_path))
    augmented_sampler = GoalBatchSampler(dataset, "image", batch_size=8, seed=11, p_aug=0.5)
    plain_sampler = GoalBatchSampler(dataset, "image", batch_size=8, seed=11, p_aug=0.0)
    batches = 200
    augmented = 0
    for step in range(batches):
        aug, plain = augmented_sampler.sample(), plain_sampler.sample()
        obs_changed = not torch.equal(aug["observations"], plain["observations"])
        assert obs_changed == (not torch.equal(aug["goals"], plain["goals"]))  # one coin for both
        assert torch.equal(aug["actions"], plain["actions"])
        augmented += obs_changed
        if obs_changed and step < 20:  # each sample's observation and goal share one offset
            offsets = recover_offsets(plain["observations"], aug["observations"])
            assert torch.equal(offsets, recover_offsets(plain["goals"], aug["goals"]))
    assert abs(augmented - batches / 2) < 4 * (batches * 0.25) ** 0.5  # binomial(200, 0.5): 4 sigma


# --- errors --------------------------------------------------------------------------------------

def test_truncated_and_corrupt_files_raise(tmp_path):
    path = write_pair(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=f"{path}.*corrupt or truncated"):
        load_dataset(path)
    flipped = bytearray(data)
    middle = len(data) // 2
    flipped[middle : middle + 64] = bytes(255 - b for b in flipped[middle : middle + 64])
    path.write_bytes(bytes(flipped))
    with pytest.raises(DatasetError, match=str(path)):
        load_dataset(path)
    path.write_text("not a zip at all")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset(path)
    assert not list(tmp_path.glob("*.partial"))  # a failed extraction leaves no half cache


def test_missing_files_raise(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset_pair(tmp_path / "absent.npz")
    path = write_pair(tmp_path)
    os.remove(tmp_path / "tiny-play-v0-val.npz")
    with pytest.raises(DatasetError, match="validation split not found.*looked for .*tiny-play-v0-val.npz"):
        load_dataset_pair(path)


def broken(arrays, kind):
    if kind == "float observations":
        arrays["observations"] = arrays["observations"].astype(np.float32)
    elif kind == "grey observations":
        arrays["observations"] = arrays["observations"][..., 0]
    elif kind == "nan actions":
        arrays["actions"][3, 1] = np.nan
    elif kind == "inf oracle":
        arrays["oracle_reps"][2, 0] = np.inf
    elif kind == "missing actions":
        del arrays["actions"]
    elif kind == "short actions":
        arrays["actions"] = arrays["actions"][:-1]
    elif kind == "integer actions":
        arrays["actions"] = arrays["actions"].astype(np.int32)
    elif kind == "no final terminal":
        arrays["terminals"][-1] = False
    elif kind == "non-binary terminals":
        arrays["terminals"] = arrays["terminals"] * 2
    elif kind == "float64 overflow":  # finite as float64, inf once read as float32
        arrays["actions"] = arrays["actions"].astype(np.float64)
        arrays["actions"][3, 1] = 1e39
    elif kind == "actions out of bounds":
        arrays["actions"][4] *= 1000
    elif kind == "non-square images":
        arrays["observations"] = arrays["observations"][:, :, :12]
    elif kind == "empty split":
        arrays = {key: value[:0] for key, value in arrays.items()}
    return arrays


@pytest.mark.parametrize("kind, message", [
    ("float observations", "uint8 .N,S,S,3. array of square images, got float32"),
    ("grey observations", "uint8 .N,S,S,3. array"),
    ("non-square images", "square images, got uint8 .22, 16, 12, 3."),
    ("float64 overflow", "actions hold NaN/inf .as float32. in 1 rows .first: row 3"),
    ("actions out of bounds", "actions must lie in \\[-1, 1\\].* at row 4: rescale them"),
    ("nan actions", "actions hold NaN/inf .as float32. in 1 rows .first: row 3"),
    ("inf oracle", "oracle_reps hold NaN/inf"),
    ("missing actions", "missing keys \\['actions'\\]"),
    ("short actions", "'actions' has shape .* observations have 22 rows"),
    ("integer actions", "actions must be a float"),
    ("no final terminal", "last row is not marked terminal"),
    ("non-binary terminals", "terminals must be a 0/1"),
    ("empty split", "the dataset has no rows"),
])
def test_malformed_content_raises(tmp_path, kind, message):
    path = tmp_path / "bad.npz"
    np.savez_compressed(path, **broken(make_arrays(), kind))
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset(path)
    assert str(path) in str(error.value)
    assert not list(tmp_path.glob("*.observations.*.npy"))  # validated before anything is decompressed


def test_a_saved_compact_dataset_loads_as_it_is(tmp_path):
    original = tmp_path / "orig.npz"
    np.savez_compressed(original, **make_arrays())
    compact = ogbench.load_dataset(str(original), ob_dtype=np.uint8, compact_dataset=True, add_info=True)
    np.savez_compressed(tmp_path / "saved.npz", **compact)
    ours, reference = load_dataset(tmp_path / "saved.npz"), load_dataset(original)
    np.testing.assert_array_equal(ours.terminals, reference.terminals)
    np.testing.assert_array_equal(ours.valids, reference.valids)
    np.testing.assert_array_equal(goal_end_indices(ours.terminals), goal_end_indices(reference.terminals))

    compact["valids"][3] = 0.0  # no longer what compacting the original gives
    np.savez_compressed(tmp_path / "bad.npz", **compact)
    with pytest.raises(DatasetError, match="terminals and valids disagree at row 2"):
        load_dataset(tmp_path / "bad.npz")


@pytest.mark.parametrize("form, message", [
    ("compact without valids", "rows 4 and 5 are both terminal .5 such pairs.*already in compact form"),
    ("transitions", "holds next_observations.*compact_dataset=False"),
])
def test_already_processed_terminals_are_refused(tmp_path, form, message):
    original = tmp_path / "orig.npz"
    np.savez_compressed(original, **make_arrays())
    processed = ogbench.load_dataset(str(original), ob_dtype=np.uint8, compact_dataset=form != "transitions")
    processed.pop("valids", None)
    np.savez_compressed(tmp_path / "processed.npz", **processed)
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path / "processed.npz")


# --- cache and fingerprint -----------------------------------------------------------------------

def test_observations_are_decompressed_once_and_memory_mapped(tmp_path):
    path = write_pair(tmp_path)
    first = load_dataset(path)
    (cache,) = tmp_path.glob("tiny-play-v0.observations.*.npy")
    written = cache.stat().st_mtime_ns
    second = load_dataset(path)
    assert cache.stat().st_mtime_ns == written  # reused, not rewritten
    assert isinstance(second.observations, np.memmap) and not second.observations.flags.writeable
    assert Path(second.observations.filename) == cache.resolve()
    np.testing.assert_array_equal(first.observations, second.observations)
    # a changed source gets a fresh cache, and the stale one goes
    os.utime(path, ns=(written + 10**9, written + 10**9))
    load_dataset(path, cache_dir=tmp_path)
    (fresh,) = tmp_path.glob("tiny-play-v0.observations.*.npy")
    assert fresh != cache
    # an explicit cache_dir keeps the dataset directory clean
    load_dataset(tmp_path / "tiny-play-v0-val.npz", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("tiny-play-v0-val.observations.*.npy"))) == 1


def test_datasets_of_one_name_and_size_never_share_a_cache(tmp_path):
    """Same stem, shapes and mtime in one cache directory: each still reads its own images."""
    first, second = tmp_path / "a" / "tiny-play-v0.npz", tmp_path / "b" / "tiny-play-v0.npz"
    for path, seed in ((first, 0), (second, 5)):
        path.parent.mkdir()
        np.savez(path, **make_arrays(seed=seed))  # uncompressed: equal shapes give equal sizes
    assert first.stat().st_size == second.stat().st_size
    os.utime(second, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns))
    cache = tmp_path / "cache"
    a, b = load_dataset(first, cache_dir=cache), load_dataset(second, cache_dir=cache)
    with np.load(second) as source:
        np.testing.assert_array_equal(b.observations, source["observations"])
    assert not np.array_equal(a.observations, b.observations)
    assert len(list(cache.glob("tiny-play-v0.observations.*.npy"))) == 2


def test_splits_that_do_not_fit_one_policy_are_refused(tmp_path):
    path = write_pair(tmp_path)
    np.savez_compressed(tmp_path / "tiny-play-v0-val.npz", **make_arrays(lengths=(4, 3), image_size=8))
    with pytest.raises(DatasetError, match="observations per row .8, 8, 3. differ from the training split's .16, 16, 3."):
        load_dataset_pair(path)


def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    path = write_pair(tmp_path)
    fingerprint = dataset_fingerprint(path)
    assert fingerprint == dataset_fingerprint(path) and len(fingerprint) == 64
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(path, copy_dir / "other.npz")
    shutil.copy(tmp_path / "tiny-play-v0-val.npz", copy_dir / "other-val.npz")
    assert dataset_fingerprint(copy_dir / "other.npz") == fingerprint  # content, not name
    np.savez_compressed(tmp_path / "tiny-play-v0-val.npz", **make_arrays(lengths=(4, 3), seed=2))
    assert dataset_fingerprint(path) != fingerprint


# --- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("on_device", [True, False])
def test_cuda_batches(tmp_path, on_device):
    dataset = load_dataset(write_pair(tmp_path))
    sampler = GoalBatchSampler(dataset, "image", batch_size=64, device="cuda", seed=0, on_device=on_device)
    assert sampler.on_device == on_device
    first = [sampler.sample() for _ in range(4)]
    again = GoalBatchSampler(dataset, "image", batch_size=64, device="cuda", seed=0, on_device=on_device)
    for batch, repeat in zip(first, (again.sample() for _ in range(4))):
        assert all(t.is_cuda for t in batch.values())
        assert batch["observations"].dtype == torch.uint8 and batch["goals"].shape == (64, 16, 16, 3)
        assert all(torch.equal(batch[k], repeat[k]) for k in batch)
