"""The evaluation command: statistics, report files, determinism, per-row w, and OGBench plumbing.

Policies here are untrained (random weights): these tests check the evaluator, not success rates
(tests/test_central_claim.py does that with a trained policy).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cfgrl_ros.checkpoint import save_checkpoint
from cfgrl_ros.engines import TorchEngine, load_engine
from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig
from cfgrl_ros.sampler import GuidedSampler
from training import evaluate as ev
from training.pointreach import TASKS, oracle_representation


class RecordingEngine:
    """A real TorchEngine that also keeps a copy of every call's inputs and outputs."""

    def __init__(self, engine: TorchEngine):
        self.engine, self.calls = engine, []
        self.name, self.config, self.device = engine.name, engine.config, engine.device

    def infer(self, observations, goals, w, noise, flow_steps):
        actions = self.engine.infer(observations, goals, w, noise, flow_steps)
        self.calls.append({k: v.clone() for k, v in dict(observations=observations, goals=goals, w=w, noise=noise,
                                                         actions=actions).items()})
        return actions


def random_engine(**config) -> RecordingEngine:
    torch.manual_seed(0)
    policy = CFGRLPolicy(PolicyConfig(**config))
    return RecordingEngine(TorchEngine(GuidedSampler(policy)))


@pytest.fixture(scope="module")
def pointreach_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "pointreach.safetensors"
    return save_checkpoint(path, CFGRLPolicy(PolicyConfig(action_dim=2, goal_dim=2, image_size=16)))


def fake_episodes(ws=(0.0, 1.0, 3.0), tasks=(1, 2), per_task=4):
    """Episode records with known counts: success iff episode < task + w (capped by per_task)."""
    return [dict(w=w, task=t, episode=e, success=e < t + w, steps=10)
            for w in ws for t in tasks for e in range(per_task)]


# --- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("successes, trials, expected", [
    (5, 10, (0.2366, 0.7634)),   # textbook values, z = 1.96
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (37, 100, (0.2818, 0.4678)),  # by hand: centre 0.374809, half-width 0.092988
])
def test_wilson_interval_known_values(successes, trials, expected):
    low, high = ev.wilson_interval(successes, trials)
    assert low == pytest.approx(expected[0], abs=1e-4) and high == pytest.approx(expected[1], abs=1e-4)


def test_wilson_interval_rejects_impossible_counts():
    for successes, trials in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            ev.wilson_interval(successes, trials)


def test_summarize_counts_and_overall_mean():
    results = ev.summarize(fake_episodes(), env="toy")
    assert results["ws"] == [0.0, 1.0, 3.0] and results["tasks"] == [1, 2] and results["env"] == "toy"
    by_w = {row["w"]: row for row in results["results"]}
    assert [t["successes"] for t in by_w[0.0]["tasks"]] == [1, 2]
    assert [t["successes"] for t in by_w[3.0]["tasks"]] == [4, 4]
    overall = by_w[1.0]["overall"]
    assert overall["successes"] == 5 and overall["episodes"] == 8
    assert overall["rate"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert overall["ci95"] == pytest.approx(list(ev.wilson_interval(5, 8)))


def test_summarize_rejects_missing_cells():
    episodes = [e for e in fake_episodes() if not (e["w"] == 1.0 and e["task"] == 2)]
    with pytest.raises(ValueError, match="w=1.0, task 2"):
        ev.summarize(episodes)
    with pytest.raises(ValueError):
        ev.summarize([])
    one_less = [e for e in fake_episodes() if not (e["w"] == 3.0 and e["task"] == 1 and e["episode"] == 0)]
    with pytest.raises(ValueError, match=r"w=3.0: unequal episodes per task \[3, 4\]"):
        ev.summarize(one_less)


# --- report files -------------------------------------------------------------------------------


def test_write_report_files_are_well_formed(tmp_path):
    results = ev.summarize(fake_episodes(), env="toy", checkpoint="c.safetensors")
    paths = ev.write_report(results, tmp_path / "report")
    assert set(paths) == {"json", "csv", "markdown", "plot"} and all(p.is_file() for p in paths.values())

    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))

    with open(paths["csv"]) as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["w", "task", "successes", "episodes", "rate", "ci95_low", "ci95_high"]
    assert len(rows) == 3 * (2 + 1)
    overall = [r for r in rows if r["task"] == "overall" and float(r["w"]) == 3.0][0]
    assert (int(overall["successes"]), int(overall["episodes"]), float(overall["rate"])) == (8, 8, 1.0)
    assert float(overall["ci95_low"]) == pytest.approx(ev.wilson_interval(8, 8)[0], abs=1e-6)

    table = [line for line in paths["markdown"].read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| w | task 1 | task 2 | overall |"
    assert len(table) == 2 + 3 and table[2].startswith("| 0 | 25.0 [")
    assert table[4].split("|")[-2].strip() == "100.0 [67.6, 100.0]"

    from matplotlib.image import imread

    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(paths["plot"])
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


# --- the sweep on PointReach --------------------------------------------------------------------


def run_pointreach(engine, **kwargs):
    options = dict(episodes_per_task=2, tasks=(1, 3), max_steps=4, flow_steps=4, seed=7, progress=False)
    return ev.evaluate(engine, "pointreach", [0.0, 1.0, 4.0], **{**options, **kwargs})


def test_each_row_gets_its_own_w():
    engine = random_engine(action_dim=2, goal_dim=2, image_size=16)
    results = run_pointreach(engine)
    first = engine.calls[0]
    assert len(first["w"]) == 3 * 2 * 2  # every (w, task, episode) row in one batched call
    assert sorted(set(first["w"].tolist())) == [0.0, 1.0, 4.0]
    # Rows 0..2 are (w=0, 1, 4) of task 1, episode 0: the same start, goal and noise, only w differs.
    for key in ("observations", "goals", "noise"):
        assert torch.equal(first[key][0], first[key][1]) and torch.equal(first[key][0], first[key][2])
    actions = first["actions"][:3]
    assert not torch.allclose(actions[0], actions[1]) and not torch.allclose(actions[1], actions[2])
    # The goal is the oracle representation of the task's goal position.
    assert torch.allclose(first["goals"][0], torch.from_numpy(oracle_representation(np.array(TASKS[0][1]))))
    assert len(engine.calls) == 4 and results["env_steps"] == 4 * 12
    assert all(e["steps"] == 4 for e in results["episodes"]) and len(results["episodes"]) == 12


def test_sweep_is_deterministic_for_a_seed_and_independent_of_workers():
    runs = []
    for seed, workers, per_worker in ((7, 0, None), (7, 0, None), (7, 2, 3), (8, 0, None)):
        engine = random_engine(action_dim=2, goal_dim=2, image_size=16)
        run_pointreach(engine, seed=seed, workers=workers, envs_per_worker=per_worker)
        runs.append(engine.calls)

    def trajectory(calls):  # noise and observations in row order, per step
        return [(c["noise"], c["observations"]) for c in calls]

    same, also_same = runs[0], runs[1]
    assert all(torch.equal(a, b) for x, y in zip(trajectory(same), trajectory(also_same)) for a, b in zip(x, y))
    # 2 spawned workers with 3 env slots each: rows run in another schedule, yet every row's
    # start state and noise are the same; compare each row's first-step inputs.
    spawned = runs[2]
    assert len(spawned[0]["w"]) == 6 and sum(len(c["w"]) for c in spawned) == 12 * 4
    first_rows_of_batch = spawned[0]
    assert torch.equal(first_rows_of_batch["noise"], same[0]["noise"][:6])
    assert torch.equal(first_rows_of_batch["observations"], same[0]["observations"][:6])
    other_seed = runs[3]
    assert not torch.equal(other_seed[0]["noise"], same[0]["noise"])


def test_command_line_writes_the_report(pointreach_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    ev.main(["--checkpoint", str(pointreach_checkpoint), "--env", "pointreach", "--w", "1", "3",
             "--episodes-per-task", "1", "--max-steps", "3", "--flow-steps", "2", "--device", "cpu",
             "--out-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(ev.REPORT_FILES.values())
    results = json.loads((out / "results.json").read_text())
    assert results["ws"] == [1.0, 3.0] and results["tasks"] == [1, 2, 3, 4, 5]
    assert results["checkpoint"] == str(pointreach_checkpoint) and results["max_steps"] == 3
    assert "| w | task 1 |" in capsys.readouterr().out


def test_mismatched_checkpoint_and_bad_arguments_are_clear_errors(pointreach_checkpoint):
    engine = random_engine(action_dim=2, goal_dim=3, image_size=16)
    with pytest.raises(ev.EvaluationError, match="goals of shape"):
        run_pointreach(engine)
    engine = random_engine(action_dim=5, goal_dim=2, image_size=16)  # a cube-arm policy on the 2-d point
    with pytest.raises(ev.EvaluationError, match="takes 2-d actions, but the checkpoint gives 5-d"):
        run_pointreach(engine)
    engine = load_engine(str(pointreach_checkpoint), "torch", "cpu")
    with pytest.raises(ValueError, match="tasks"):
        run_pointreach(engine, tasks=(0, 1))
    with pytest.raises(ValueError):
        ev.evaluate(engine, "pointreach", [], progress=False)
    with pytest.raises(ev.EvaluationError, match="unknown env"):
        ev.evaluate(engine, "visual-cube-nonexistent-v0", [1.0], progress=False)
    with pytest.raises(ev.SweepSettingsError, match="w must be finite numbers, got \\[inf, 1.0\\]"):
        ev.evaluate(engine, "pointreach", [math.inf, 1.0], progress=False)


def test_non_finite_actions_stop_the_sweep():
    """A diverged policy's NaN actions would step the simulator with garbage and score as failures."""
    engine = random_engine(action_dim=2, goal_dim=2, image_size=16)
    with torch.no_grad():
        next(engine.engine.sampler.parameters()).fill_(math.nan)
    with pytest.raises(ev.EvaluationError, match="non-finite actions on pointreach"):
        run_pointreach(engine)
    assert len(engine.calls) == 1 and torch.isnan(engine.calls[0]["actions"]).all()


@pytest.mark.parametrize("env_name, config, reason", [
    ("pointreach", dict(action_dim=5, goal_dim=2, image_size=16), "takes 2-d actions, but the checkpoint gives 5-d"),
    ("pointreach", dict(action_dim=2, goal_dim=3, image_size=16), "oracle goals of shape \\(2,\\)"),
    ("visual-cube-single-v0", dict(action_dim=2, goal_dim=2, image_size=64), "takes 5-d actions"),
    ("visual-cube-single-v0", dict(action_dim=5, goal_dim=2, image_size=64), "oracle goals of shape \\(3,\\)"),
])
def test_a_checkpoint_for_another_env_is_refused_from_one_reset(env_name, config, reason):
    """What the ROS evaluator checks before it starts the nodes (which would wait forever on such a policy)."""
    spec = ev.EnvSpec(env_name, "oracle", config["image_size"], 5)
    with pytest.raises(ev.EvaluationError, match=reason):
        ev.check_checkpoint_fits_env(PolicyConfig(**config), spec)
    fitting = dict(action_dim=2, goal_dim=2, image_size=16) if env_name == "pointreach" else \
        dict(action_dim=5, goal_dim=3, image_size=64)
    ev.check_checkpoint_fits_env(PolicyConfig(**fitting), spec)


@pytest.mark.parametrize("flags, reason", [
    (["--w", "nan"], "w must be finite numbers"),
    (["--w", "1", "3", "1.0"], "w values must be distinct, got \\[1.0, 3.0, 1.0\\]"),
    (["--episodes-per-task", "0", "--max-steps", "0"], "episodes_per_task must be >= 1, got 0; max_steps must be >= 1"),
    (["--tasks", "9"], "tasks must be distinct ids in 1..5, got \\[9\\]"),
    (["--envs-per-worker", "0"], "envs_per_worker must be >= 1"),
    (["--backend", "tensorrtt"], "--backend 'tensorrtt': choose from"),
    (["--device", "tpu"], "--device 'tpu' is not a torch device"),
])
def test_command_line_refuses_bad_settings_before_the_sweep(pointreach_checkpoint, tmp_path, flags, reason):
    with pytest.raises(SystemExit, match=f"cfgrl-evaluate: error: .*{reason}"):
        ev.main(["--checkpoint", str(pointreach_checkpoint), "--env", "pointreach", "--device", "cpu",
                 "--out-dir", str(tmp_path / "eval"), *flags])
    assert not (tmp_path / "eval").exists()


def test_command_line_reports_a_bad_checkpoint_or_output_dir(pointreach_checkpoint, tmp_path):
    (tmp_path / "not-a-checkpoint.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SystemExit, match="cfgrl-evaluate: error: .*not-a-checkpoint.safetensors"):
        ev.main(["--checkpoint", str(tmp_path / "not-a-checkpoint.safetensors"), "--env", "pointreach"])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cfgrl-evaluate: error: .*file"):
        ev.main(["--checkpoint", str(pointreach_checkpoint), "--env", "pointreach", "--device", "cpu",
                 "--out-dir", str(tmp_path / "file" / "eval")])


def test_reports_of_the_embedded_policy_stay_out_of_the_package(tmp_path):
    embedded = Path(ev.__file__).resolve().parents[1] / "cfgrl_ros" / "data" / "default_policy.safetensors"
    assert ev.default_report_dir(embedded, "eval", "pointreach") == Path("runs/default_policy/eval-pointreach")
    own = tmp_path / "run" / "checkpoint.safetensors"
    assert ev.default_report_dir(own, "ros-eval", "pointreach") == tmp_path / "run" / "ros-eval-pointreach"


# --- OGBench: real MuJoCo rendering -------------------------------------------------------------


def test_ogbench_visual_cube_plumbing_oracle_goals_match_ogbench():
    """1 task, 1 episode, 3 steps, w in {1, 3}: once in a spawned worker, once in-process."""
    import gymnasium
    import ogbench  # noqa: F401 - registers the envs
    runs = []
    for workers in (1, 0):
        engine = random_engine(action_dim=5, goal_mode="oracle", goal_dim=3, image_size=64)
        results = ev.evaluate(engine, "visual-cube-single-v0", [1.0, 3.0], episodes_per_task=1, tasks=[2],
                              workers=workers, max_steps=3, flow_steps=2, seed=3, progress=False)
        runs.append((engine.calls, results))
        assert [e["steps"] for e in results["episodes"]] == [3, 3] and results["env_steps"] == 6
        assert [row["tasks"][0]["episodes"] for row in results["results"]] == [1, 1]
        first = engine.calls[0]
        assert first["observations"].shape == (2, 64, 64, 3) and first["observations"].dtype == torch.uint8
        assert not torch.equal(first["observations"][0], torch.zeros_like(first["observations"][0]))

    (spawned, _), (local, _) = runs
    for a, b in zip(spawned, local):  # same seed: same renders and actions, whichever process stepped
        assert torch.equal(a["observations"], b["observations"]) and torch.equal(a["actions"], b["actions"])

    # The goal is exactly what OGBench's "-oraclerep" env gives for this task and seed ...
    env = gymnasium.make("visual-cube-single-v0", use_oracle_rep=True)
    seed = ev.episode_seed(3, 2, 0)
    env.unwrapped.action_space.seed(seed)
    _, info = env.reset(seed=seed, options=dict(task_id=2, render_goal=True))
    assert np.allclose(local[0]["goals"][0].numpy(), info["goal"], atol=1e-6)
    # ... which is (goal cube xyz - [0.425, 0, 0]) * 10, up to the settling steps of the goal set-up.
    goal_xyz = env.unwrapped.cur_task_info["goal_xyzs"][0]
    assert np.allclose(info["goal"], (goal_xyz - [0.425, 0.0, 0.0]) * 10, atol=0.1)
    env.close()


def test_ogbench_image_goals_are_rendered_goal_observations():
    engine = random_engine(action_dim=5, goal_mode="image", image_size=64)
    ev.evaluate(engine, "visual-cube-single-v0", [2.0], episodes_per_task=1, tasks=[1], workers=0,
                max_steps=1, flow_steps=2, progress=False)
    goals, observations = engine.calls[0]["goals"], engine.calls[0]["observations"]
    assert goals.shape == (1, 64, 64, 3) and goals.dtype == torch.uint8
    assert not torch.equal(goals, observations)  # the cube sits elsewhere in the goal image
    assert math.isfinite(float(engine.calls[0]["actions"].abs().max()))


def test_image_goals_are_reproducible_for_a_seed():
    """OGBench's goal set-up moves the arm with an unseeded action space; seed_goal_setup pins it."""
    spec = ev.EnvSpec("visual-cube-single-v0", "image", 64, 5)
    goals = []
    for _ in range(2):
        batch = ev.OGBenchBatch(spec, 1)
        _, goal = batch.reset(np.array([0]), np.array([2]), np.array([5], np.uint64))
        batch.close()
        goals.append(goal)
    np.testing.assert_array_equal(goals[0], goals[1])


def test_a_stuck_env_worker_is_an_error_not_a_hang(monkeypatch):
    """SIGSTOP one spawned PointReach worker: the next step must fail with a named error within the timeout."""
    import os
    import signal

    spec = ev.EnvSpec("pointreach", "oracle", 16, 30)
    with ev.EnvPool(spec, num_slots=2, workers=2) as pool:
        pool.reset(np.arange(2), np.array([1, 2]), np.array([0, 1]))
        # Short only from here: the workers' start (each imports torch) may take longer on a loaded machine.
        monkeypatch.setattr(ev, "WORKER_REPLY_TIMEOUT_S", 3.0)
        os.kill(pool.processes[1].pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(ev.EvaluationError, match="env worker 1 sent nothing for 3 s: stuck"):
                pool.step(np.arange(2), np.zeros((2, pool.action_dim), np.float32))
            assert time.monotonic() - start < 30
        finally:
            os.kill(pool.processes[1].pid, signal.SIGCONT)


def test_partial_results_count_only_complete_rounds():
    """Successful episodes end first: an unfinished round must not count, or success is overstated."""
    episodes = [dict(w=w, task=t, episode=k, success=(w == 3.0)) for k in range(2) for t in (1, 2) for w in (1.0, 3.0)]
    episodes += [dict(w=3.0, task=1, episode=2, success=True)]  # round 2 only begun
    partial = ev.partial_results(episodes, [1.0, 3.0], [1, 2])
    assert partial["complete_rounds"] == 2 and partial["episodes_per_w"] == 4 and partial["episodes_finished"] == 9
    assert partial["overall"]["1"]["successes"] == 0 and partial["overall"]["3"]["successes"] == 4


def test_an_interrupted_sweep_leaves_its_partial_results(tmp_path):
    import os
    import signal

    class InterruptedEngine(RecordingEngine):
        """SIGINT, as `timeout --signal=INT` sends, once some episodes must have ended (not after a fixed time,
        which a loaded machine may spend on the first round)."""

        def infer(self, *args):
            actions = super().infer(*args)
            if len(self.calls) == 3 * 30:  # PointReach episodes end within 30 steps
                os.kill(os.getpid(), signal.SIGINT)
            return actions

    engine = random_engine(action_dim=2, goal_dim=2, image_size=16)
    engine = InterruptedEngine(engine.engine)
    path = tmp_path / "partial-results.json"
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(engine, "pointreach", [1.0, 3.0], episodes_per_task=10_000, tasks=(1, 2), workers=0,
                    envs_per_worker=8, flow_steps=2, progress=False, partial_path=path)
    partial = json.loads(path.read_text())
    assert partial["partial"] and partial["episodes_finished"] > 0
    assert partial["episodes_per_w"] == 2 * partial["complete_rounds"]
