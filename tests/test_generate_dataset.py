"""Dataset generation: a tiny real run (OGBench oracles, EGL rendering), its loading, resuming and checks.

One reference run (visual-cube-single play, 2 train + 1 val episodes of 10 steps, one episode per
shard, shadow map 256 to keep llvmpipe fast) is shared by the tests; everything else is compared to it.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training import dataset_files as files
from training import generate_dataset as gen
from training.oracle_goals import OracleGoalError, oracle_goal_dim, oracle_goals

pytestmark = pytest.mark.filterwarnings('ignore:.*precision lowered by casting:UserWarning')  # gymnasium's Box
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = gen.GenerationConfig(
    env='cube-single', variant='play', num_episodes=2, num_val_episodes=1, episode_length=10, shadow_size=256,
    shard_episodes=1,
)


@pytest.fixture(scope='session')
def reference(tmp_path_factory) -> Path:
    """An uninterrupted one-worker run; shards kept so tests can damage copies of them."""
    out_dir = tmp_path_factory.mktemp('reference')
    gen.generate(TINY, out_dir, workers=1, keep_shards=True, preview=out_dir / 'preview.png')
    return out_dir


def paths(cfg: gen.GenerationConfig, out_dir: Path) -> tuple[Path, Path, Path, Path]:
    return gen.output_paths(cfg, out_dir)


def test_output_loads_through_ogbench_and_the_project_loader(reference, tmp_path):
    import ogbench

    from training.data import compact_terminals

    train_path, val_path, _, record_path = paths(TINY, reference)
    assert train_path.name == 'visual-cube-single-play-v0.npz' and val_path.name == 'visual-cube-single-play-v0-val.npz'
    for path, episodes in ((train_path, 2), (val_path, 1)):
        rows = episodes * TINY.episode_length
        data = ogbench.load_dataset(str(path), compact_dataset=True)
        assert data['observations'].shape == (rows, 64, 64, 3)
        assert data['actions'].shape == (rows, 5) and np.abs(data['actions']).max() <= 1
        assert data['valids'].sum() == rows - episodes  # each episode's last row has no next state
        with np.load(path) as raw:
            assert raw['observations'].dtype == np.uint8 and raw['terminals'].dtype == bool
            assert raw['qpos'].shape == (rows, 21) and raw['qvel'].shape == (rows, 20)
            assert np.flatnonzero(raw['terminals']).tolist() == list(range(9, rows, 10))
            np.testing.assert_array_equal(raw['oracle_reps'], oracle_goals('cube-single', raw['qpos']))  # as ogbench computes
            assert raw['observations'].std() > 10  # real frames, not blanks
    assert (reference / 'preview.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with np.load(train_path) as raw:  # the preview's goals are goals training could draw
        rows, goals = gen.preview_goal_pairs(compact_terminals(raw['terminals'])[0], TINY.episode_length, 2)
    assert rows.tolist() == [0, 3, 6, 10, 13, 16]
    episode_ends = rows - rows % 10 + 8  # the last valid row: the final row has no next state, never a goal
    assert ((goals > rows) & (goals <= episode_ends)).all()
    assert '"transitions_produced": 30' in record_path.read_text()

    from training.data import load_dataset_pair

    train, val = load_dataset_pair(train_path, env_name='cube-single', cache_dir=tmp_path)
    assert len(train) == 20 and len(val) == 10
    assert train.goal_vectors().shape == (20, oracle_goal_dim('cube-single'))
    with np.load(train_path) as raw:
        np.testing.assert_array_equal(np.asarray(train.observations), raw['observations'])


def test_a_run_killed_before_its_clean_up_keeps_its_record(reference, tmp_path):
    """Shards still there after the record was written: the rerun merges again and keeps the record's figures."""
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    _, _, shard_dir, record_path = paths(TINY, tmp_path)
    recorded = record_path.read_text()
    gen.generate(TINY, tmp_path, workers=1)
    assert record_path.read_text() == recorded and '"transitions_produced": 30' in recorded
    assert not shard_dir.exists()


def test_killed_parallel_run_resumes_to_identical_bytes(reference, tmp_path):
    """Kill a 2-worker CLI run after its first shard, resume in-process: same bytes as one worker, no kill."""
    train_path, val_path, shard_dir, record_path = paths(TINY, tmp_path)
    cmd = [
        sys.executable, '-m', 'training.generate_dataset', '--env', 'cube-single', '--num-episodes', '2',
        '--num-val-episodes', '1', '--episode-length', '10', '--shadow-size', '256', '--shard-episodes', '1',
        '--workers', '2', '--out-dir', str(tmp_path),
    ]
    log_path = tmp_path / 'cli.log'
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True, stdout=log, stderr=log)
    try:
        deadline = time.time() + 90
        while not list(shard_dir.glob('shard-*.npz')) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its spawned workers
        proc.wait()
    done = sorted(p.name for p in shard_dir.glob('shard-*.npz'))
    # The merge runs beside production, so a merged file may already exist; the run record comes last.
    assert done and not record_path.exists(), f'not interrupted mid-run: {done}\n{log_path.read_text()}'

    gen.generate(TINY, tmp_path, workers=1)
    record = json.loads(record_path.read_text())
    assert record['transitions_produced'] == (3 - len(done)) * TINY.episode_length  # only what was missing
    assert record['shards_already_done'] == len(done)
    ref_train, ref_val, _, _ = paths(TINY, reference)
    assert train_path.read_bytes() == ref_train.read_bytes()
    assert val_path.read_bytes() == ref_val.read_bytes()
    assert not shard_dir.exists()


def test_ctrl_c_stops_a_parallel_run_cleanly_and_it_resumes(reference, tmp_path):
    """SIGINT to the process group (what a terminal's Ctrl-C does) of a 2-worker CLI run: exit 130 with
    a one-line note and no traceback from the parent or its workers; the next run resumes to the same bytes."""
    train_path, val_path, shard_dir, _ = paths(TINY, tmp_path)
    cmd = [
        sys.executable, '-m', 'training.generate_dataset', '--env', 'cube-single', '--num-episodes', '2',
        '--num-val-episodes', '1', '--episode-length', '10', '--shadow-size', '256', '--shard-episodes', '1',
        '--workers', '2', '--out-dir', str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not list(shard_dir.glob('shard-*.npz')) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        running = proc.poll() is None  # the first shard is done; the third has not started
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert running, f'the run ended before the interrupt could be sent:\n{output}'
    assert proc.returncode == 130, output  # a run that ignored SIGINT would finish with 0
    assert 'interrupted; the finished shards are kept' in output and 'Traceback' not in output, output
    assert not _spawned_workers(proc.pid)
    gen.generate(TINY, tmp_path, workers=1)
    assert train_path.read_bytes() == paths(TINY, reference)[0].read_bytes()
    assert val_path.read_bytes() == paths(TINY, reference)[1].read_bytes()


def test_command_line_mistakes_are_one_line_errors(reference, tmp_path, capsys):
    base = ['--env', 'cube-single', '--num-episodes', '2', '--num-val-episodes', '1', '--episode-length', '10',
            '--shadow-size', '256', '--shard-episodes', '1', '--workers', '1']
    (tmp_path / 'a-file').write_text('')
    finished = tmp_path / 'finished'  # the reference's files without its shards: a complete run
    finished.mkdir()
    for path in (p for p in paths(TINY, reference) if p.suffix != '.shards'):
        shutil.copy(path, finished)
    cases = [
        (['--out-dir', str(tmp_path / 'a-file')], 'is a file, not a directory'),
        (['--workers', '0', '--out-dir', str(tmp_path)], '--workers must be >= 1, got 0'),
        (['--episode-length', '1', '--out-dir', str(tmp_path)], r'episode_length \(--episode-length\) must be >= 2, got 1'),
        (['--seed', '3', '--out-dir', str(finished)], r'other settings \(seed 0 -> 3\); pass --overwrite'),
        (['--seed', '3', '--out-dir', str(reference)], r'shards made with other settings or versions \(settings.seed 0 -> 3\)'),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            gen.main(base + extra)
        assert str(exit_info.value.code).startswith('cfgrl-generate: error: '), exit_info.value.code
        assert re.search(message, str(exit_info.value.code)), exit_info.value.code
    gen.main(base + ['--out-dir', str(finished)])  # the same settings: nothing to do, and it says so
    assert 'already complete' in capsys.readouterr().out


def test_corrupt_shard_is_detected_named_and_regenerated(reference, tmp_path):
    _, _, ref_shards, _ = paths(TINY, reference)
    train_path, val_path, shard_dir, _ = paths(TINY, tmp_path)
    shutil.copytree(ref_shards, shard_dir)
    shards = gen.plan_shards(TINY)
    truncated, flipped = shard_dir / shards[1].filename, shard_dir / shards[2].filename
    truncated.write_bytes(truncated.read_bytes()[:-500])  # as by a full disk
    damaged = bytearray(flipped.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the compressed observations
    flipped.write_bytes(bytes(damaged))

    layout = gen.file_layout(TINY)
    for shard, path in ((shards[1], truncated), (shards[2], flipped)):
        with pytest.raises(files.CorruptShardError, match=shard.filename):
            files.load_shard(path, layout, shard.num_episodes)
    with pytest.raises(files.CorruptShardError, match=shards[1].filename):
        files.merge_shards(layout, [shard_dir / s.filename for s in shards[:2]], 2, tmp_path / 'merged.npz')

    with pytest.warns(UserWarning) as caught:
        gen.generate(TINY, tmp_path, workers=1)
    messages = ' '.join(str(w.message) for w in caught)
    assert f'{shards[1].filename}' in messages and f'{shards[2].filename}' in messages
    assert 'producing it again' in messages
    assert train_path.read_bytes() == paths(TINY, reference)[0].read_bytes()
    assert val_path.read_bytes() == paths(TINY, reference)[1].read_bytes()


def test_validation_rejects_damaged_or_mismatched_files(reference, tmp_path):
    train_path = paths(TINY, reference)[0]
    layout = gen.file_layout(TINY)
    files.validate_dataset(train_path, layout, num_episodes=2)
    with pytest.raises(files.DatasetValidationError, match='observations'):
        files.validate_dataset(train_path, layout, num_episodes=3)
    with pytest.raises(files.DatasetValidationError, match='episode_length|every 5-th'):
        files.validate_dataset(train_path, dataclasses.replace(layout, episode_length=5), num_episodes=4)
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(train_path.read_bytes()[:-2000])
    with pytest.raises(files.DatasetValidationError, match='truncated'):
        files.validate_dataset(truncated, layout, num_episodes=2)


def test_resume_refuses_a_shard_dir_made_with_other_settings(reference, tmp_path):
    shutil.copytree(paths(TINY, reference)[2], paths(TINY, tmp_path)[2])
    other_seed = dataclasses.replace(TINY, seed=1)
    with pytest.raises(gen.GenerationError, match='other settings.*seed'):
        gen.generate(other_seed, tmp_path, workers=1)


def test_resume_refuses_shards_it_cannot_trust(reference, tmp_path):
    shard_dir = paths(TINY, tmp_path)[2]
    shutil.copytree(paths(TINY, reference)[2], shard_dir)
    (shard_dir / 'manifest.json').write_text('{"settings": {"env": "cube-')  # cut short by a kill
    with pytest.raises(gen.GenerationError, match='manifest.json is unreadable'):
        gen.generate(TINY, tmp_path, workers=1)
    (shard_dir / 'manifest.json').unlink()  # shards of unknown settings
    with pytest.raises(gen.GenerationError, match='holds shards but no manifest.json'):
        gen.generate(TINY, tmp_path, workers=1)
    manifest = gen.shard_manifest(TINY)
    manifest['versions']['mujoco'] = '0.0.1'  # another simulator draws other frames
    (shard_dir / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(gen.GenerationError, match="other settings or versions.*versions.mujoco '0.0.1' -> "):
        gen.generate(TINY, tmp_path, workers=1)


def test_a_shard_does_not_depend_on_the_shards_before_it(tmp_path, monkeypatch):
    """Scene's noisy oracles read target state the env keeps across resets: shard 1 made after shard 0
    (one worker, both in turn) must equal shard 1 made alone. Physics only: rendering is blanked."""
    cfg = gen.GenerationConfig(env='scene', variant='noisy', num_episodes=2, num_val_episodes=0, episode_length=150,
                               render_mode='replay', shard_episodes=1, shadow_size=256)
    monkeypatch.setattr(gen.ShardCollector, '_render',
                        lambda self, frames, report: np.zeros((len(frames), 64, 64, 3), np.uint8))
    first, second = gen.plan_shards(cfg)[:2]
    after, alone = tmp_path / 'after', tmp_path / 'alone'
    after.mkdir(), alone.mkdir()
    gen._produce_shard(cfg, first, after, lambda n: None)
    gen._produce_shard(cfg, second, after, lambda n: None)
    gen._produce_shard(cfg, second, alone, lambda n: None)
    with np.load(after / second.filename) as a, np.load(alone / second.filename) as b:
        for key in ('actions', 'qpos', 'button_states', 'oracle_reps'):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_worker_that_dies_stops_the_run_with_a_named_error(tmp_path):
    """SIGKILL one spawned worker of a 2-worker CLI run: the run must end (not hang) and say why."""
    cmd = [sys.executable, '-m', 'training.generate_dataset', '--env', 'cube-single', '--num-episodes', '4',
           '--num-val-episodes', '1', '--episode-length', '40', '--shadow-size', '256', '--shard-episodes', '1',
           '--workers', '2', '--out-dir', str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, victim = time.time() + 120, None
        while victim is None and proc.poll() is None and time.time() < deadline:
            victim = next(iter(_spawned_workers(proc.pid)), None)
            time.sleep(0.2)
        assert victim is not None, 'no worker process appeared'
        time.sleep(2)  # inside its first shard
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, output
    assert 'a worker process died' in output and 'exit code -9' in output, output[-2000:]


def _spawned_workers(parent_pid: int) -> list[int]:
    """Pids of the parent's multiprocessing-spawn children (not its resource tracker)."""
    pids = []
    for status in Path('/proc').glob('[0-9]*/status'):
        try:
            fields = dict(line.split(':\t', 1) for line in status.read_text().splitlines() if ':\t' in line)
            cmdline = (status.parent / 'cmdline').read_bytes().decode(errors='replace')
        except OSError:
            continue
        if fields.get('PPid', '').strip() == str(parent_pid) and 'spawn_main' in cmdline:
            pids.append(int(status.parent.name))
    return pids


def test_replay_rendering_reproduces_env_frames(reference):
    """Physics-only rollout + re-rendering from recorded states: bit-identical to the env's frames, with one
    frame per readback and with many (3x3 tiles: every tile row and column, and a partial second batch)."""
    with np.load(paths(TINY, reference)[0]) as raw:
        env_frames = raw['observations'][:10]
        env_qpos = raw['qpos'][:10]
    for tiles in (1, 3):
        cfg = dataclasses.replace(TINY, render_mode='replay', render_tiles=tiles)
        collector = gen.ShardCollector(cfg)
        arrays, _ = collector.collect(gen.plan_shards(cfg)[0], report=lambda n: None)
        collector.close()
        np.testing.assert_array_equal(arrays['qpos'], env_qpos)
        diff = np.abs(arrays['observations'].astype(int) - env_frames.astype(int))
        assert diff.max() == 0, (tiles, diff.mean(), diff.max())
        assert collector.seconds['rollout'] > 0 and collector.seconds['render'] > 0  # bench_render's two phases


def _random_states(env_id: str, steps: int = 25):
    """Live states of a state-based env: (qpos rows, button rows or None, env's own oracle observations)."""
    import gymnasium

    import ogbench.manipspace  # noqa: F401

    env = gymnasium.make(env_id, terminate_at_goal=False, mode='data_collection', disable_env_checker=True)
    env.reset(seed=3)
    env.action_space.seed(3)
    unwrapped = env.unwrapped
    qpos, buttons, expected = [], [], []
    for step in range(steps):
        env.step(env.action_space.sample())
        if step % 8 == 0:
            unwrapped.set_new_target(return_info=False)
        qpos.append(unwrapped.data.qpos.copy())
        buttons.append(getattr(unwrapped, '_cur_button_states', np.zeros(0)).copy())
        expected.append(unwrapped.compute_oracle_observation())
    buttons = np.array(buttons) if buttons[0].size else None
    return np.array(qpos), buttons, np.array(expected)


@pytest.mark.parametrize('env_id', ['cube-single-v0', 'cube-double-v0', 'scene-v0', 'puzzle-3x3-v0'])
def test_oracle_goals_match_the_env(env_id):
    qpos, buttons, expected = _random_states(env_id)
    goals = oracle_goals(env_id, qpos, buttons)
    assert goals.dtype == np.float32 and goals.shape == expected.shape == (len(qpos), oracle_goal_dim(env_id))
    np.testing.assert_allclose(goals, expected, rtol=0, atol=1e-5)


def test_oracle_goals_reject_bad_input():
    with pytest.raises(OracleGoalError, match='not an OGBench manipulation env'):
        oracle_goals('antmaze-large-navigate-v0', np.zeros((1, 15)))
    with pytest.raises(OracleGoalError, match='21 entries'):
        oracle_goals('visual-cube-single-play-v0', np.zeros((4, 28)))
    with pytest.raises(OracleGoalError, match='pass button_states'):
        oracle_goals('scene', np.zeros((4, 25)))
    with pytest.raises(OracleGoalError, match=r'\(4, 9\)'):
        oracle_goals('puzzle-3x3-oraclerep', np.zeros((4, 23)), np.zeros((4, 2)))


def test_config_and_shard_plan():
    with pytest.raises(gen.GenerationError, match='unknown env'):
        gen.GenerationConfig(env='cube-triple', variant='play')
    with pytest.raises(gen.GenerationError, match='unknown variant'):
        gen.GenerationConfig(env='scene', variant='expert')
    with pytest.raises(gen.GenerationError, match=r'num_episodes \(--num-episodes\) must be >= 1, got 0'):
        gen.GenerationConfig(env='scene', variant='play', num_episodes=0)
    cfg = gen.GenerationConfig(env='scene', variant='noisy', num_episodes=25, num_val_episodes=2, shard_episodes=10)
    plan = gen.plan_shards(cfg)
    assert [(s.index, s.split, s.num_episodes) for s in plan] == [
        (0, 'train', 10), (1, 'train', 10), (2, 'train', 5), (3, 'val', 2)
    ]
    # A shard's seeds depend only on (seed, shard index).
    assert gen.shard_seeds(0, 2)[:2] == gen.shard_seeds(0, 2)[:2] != gen.shard_seeds(0, 3)[:2]
    assert gen.GenerationConfig('scene', 'play').num_val_episodes == 100  # OGBench: num_episodes // 10
    assert gen.GenerationConfig('scene', 'play', num_episodes=5).num_val_episodes == 1  # never an empty split
    assert gen.GenerationConfig('scene', 'play', num_val_episodes=0).num_val_episodes == 0  # on request
    assert gen.parse_args(['--env', 'scene']).num_val_episodes is None  # the config's default
    assert list(gen.dataset_schema(cfg)) == [
        'observations', 'actions', 'terminals', 'qpos', 'qvel', 'button_states', 'oracle_reps'
    ]


def _train_shards(reference: Path) -> tuple[list[gen.Shard], Path]:
    _, _, ref_shards, _ = paths(TINY, reference)
    return [s for s in gen.plan_shards(TINY) if s.split == 'train'], ref_shards


def _merge_into(tmp_path: Path, shards: list[gen.Shard], out: Path) -> files.BackgroundMerge:
    return files.BackgroundMerge(gen.file_layout(TINY), [tmp_path / s.filename for s in shards], len(shards), out)


def test_background_merge_takes_shards_as_they_appear(reference, tmp_path):
    shards, ref_shards = _train_shards(reference)
    out = tmp_path / 'train.npz'
    with _merge_into(tmp_path, shards, out):
        for shard in shards:  # as workers would: late, one at a time, atomically
            time.sleep(3 * files.BackgroundMerge.POLL_S)
            assert not out.exists()
            shutil.copy(ref_shards / shard.filename, tmp_path / f'{shard.filename}.part')
            os.replace(tmp_path / f'{shard.filename}.part', tmp_path / shard.filename)
    assert out.read_bytes() == paths(TINY, reference)[0].read_bytes()


def test_background_merge_stops_with_production_and_names_a_missing_shard(reference, tmp_path):
    shards, ref_shards = _train_shards(reference)
    out = tmp_path / 'train.npz'
    shutil.copy(ref_shards / shards[0].filename, tmp_path / shards[0].filename)
    with pytest.raises(KeyboardInterrupt):  # production interrupted: the merge stops, no file, no temp file
        with _merge_into(tmp_path, shards, out):
            time.sleep(3 * files.BackgroundMerge.POLL_S)
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [shards[0].filename]
    with pytest.raises(files.CorruptShardError, match=f'{shards[1].filename} is missing after production'):
        with _merge_into(tmp_path, shards, out):
            pass  # production "finished" without the second shard
    assert not out.exists() and not list(tmp_path.glob('*.tmp-*'))


def test_streamed_npz_matches_numpy(tmp_path):
    arrays = {'a': np.arange(12, dtype=np.float32).reshape(6, 2), 'b': np.array([True, False, True])}
    entries = {
        key: (value.shape, value.dtype, lambda value=value: (value[:2], value[2:])) for key, value in arrays.items()
    }
    path = tmp_path / 'x.npz'
    files.write_npz_streaming(path, entries)
    with np.load(path) as loaded:
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded[key], value)
    with zipfile.ZipFile(path) as archive:
        assert all(info.date_time == files.ZIP_DATE for info in archive.infolist())
    bad = {'a': ((7, 2), np.dtype(np.float32), lambda: (arrays['a'],))}
    with pytest.raises(files.DatasetFileError, match='wrote 6 rows'):
        files.write_npz_streaming(tmp_path / 'y.npz', bad)
