"""The reproduction command (training/reproduce.py): the smoke scale end to end on this CPU, then
skipping, resuming and refusing on the same run directory.

The module runs the real command once (generation, training, evaluation, report: about 1.5 min on a
2-core CPU); the tests after it reuse that run directory, each leaving it complete again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from training import reproduce
from training.data import load_dataset_pair
from training.evaluate import summarize
from training.train import train

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = ["--task", "visual-cube-single", "--goal-mode", "oracle"]
SMOKE = yaml.safe_load((REPO_ROOT / "config/reproduce/smoke.yaml").read_text())
DATASET = "visual-cube-single-play-v0"


def run_in_process(out: Path, *extra: str, scale: str = "smoke") -> str:
    """main() in this process (no second import of torch and mujoco); returns what it printed."""
    return _capture(lambda: reproduce.main([*TASK, "--scale", scale, "--out", str(out), *extra]))


def _capture(function) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        function()
    return buffer.getvalue()


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    """The documented command, as a user types it, in a fresh directory."""
    out = tmp_path_factory.mktemp("repro") / "run"
    command = [sys.executable, "-m", "training.reproduce", *TASK, "--scale", "smoke", "--out", str(out)]
    env = {**os.environ, "MUJOCO_GL": "egl"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out, done.stdout


def test_smoke_run_produces_every_stage_and_the_report(smoke_run):
    out, stdout = smoke_run
    for stage in ("generate", "train", "evaluate", "report"):
        assert f"[{stage}] running (attempt 1)" in stdout

    # generation: OGBench-format files that the training loader reads, with oracle goals
    train_data, val_data = load_dataset_pair(out / "data" / f"{DATASET}.npz")
    d = SMOKE["dataset"]
    assert len(train_data) == d["num_episodes"] * d["episode_length"]
    assert len(val_data) == d["num_val_episodes"] * d["episode_length"]
    assert train_data.observations.shape[1:] == (64, 64, 3) and train_data.oracle_reps.shape[1] == 3
    assert (out / "data" / f"{DATASET}.preview.png").stat().st_size > 0

    # training: a checkpoint at the scale's final step
    from cfgrl_ros.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(out / "train" / "checkpoint.safetensors")
    assert checkpoint.step == SMOKE["training"]["steps"] and checkpoint.config.goal_mode == "oracle"

    # evaluation: every w of the sweep, task 1, one short episode each
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["ws"] == [0.0, 1.0, 1.5, 2.0, 3.0, 4.0] and results["tasks"] == [1]
    assert len(results["episodes"]) == 6 and all(e["steps"] <= 3 for e in results["episodes"])
    for name in ("results.csv", "results.md", "success_vs_w.png"):
        assert (out / "eval" / name).stat().st_size > 0

    # every stage record says done, with its wall time and machine
    records = [json.loads(p.read_text()) for p in
               (out / "data" / f"{DATASET}.stage.json", *(out / s / "stage.json" for s in ("train", "eval", "report")))]
    assert all(r["status"] == "done" and r["attempts"] == 1 and r["wall_s"] >= 0 and r["machine"]["cpu"]
               for r in records)

    # the report: the command, machines, stage times, sizes, the table, the plot and a computed verdict
    report = (out / "report" / "report.md").read_text()
    assert "python -m training.reproduce --task visual-cube-single --goal-mode oracle --scale smoke" in report
    assert "GPU: none" in report and "| generate |" in report and "| evaluate |" in report
    assert "2 train + 1 validation episodes x 10 steps = 20 + 10 transitions" in report
    assert "6 steps at batch 8" in report and "= 6 episodes (1 per w), at most 3 steps each" in report
    assert "| 1.5 |" in report and "![success rate against w](success_vs_w.png)" in report
    assert (out / "report" / "success_vs_w.png").stat().st_size > 0
    comparison = reproduce.compare(results)
    assert json.loads((out / "report" / "comparison.json").read_text())["target_met"] == comparison["target_met"]
    assert ("**met**" if comparison["target_met"] else "**not met**") in report
    assert report in stdout  # printed at the end


def test_rerun_skips_every_stage(smoke_run):
    out, _ = smoke_run
    before = mtimes(out)
    printed = run_in_process(out)
    for stage in ("generate", "train", "evaluate", "report"):
        assert f"[{stage}] done earlier" in printed and f"[{stage}] running" not in printed
    assert mtimes(out) == before  # nothing was rewritten


def test_resume_after_deleting_the_evaluation_reruns_only_it(smoke_run):
    out, _ = smoke_run
    before = mtimes(out)
    episodes = json.loads((out / "eval" / "results.json").read_text())["episodes"]
    shutil.rmtree(out / "eval")
    printed = run_in_process(out)
    assert "[generate] done earlier" in printed and "[train] done earlier" in printed
    assert "[evaluate] running" in printed and "[report] running" in printed  # the report is rebuilt from it
    after = mtimes(out)
    for name in (f"data/{DATASET}.npz", "train/checkpoint.safetensors"):
        assert after[name] == before[name]
    # Same checkpoint, seeds and noise: the same episodes, outcome for outcome.
    assert json.loads((out / "eval" / "results.json").read_text())["episodes"] == episodes


def test_an_interrupted_training_resumes_and_matches_the_uninterrupted_run(smoke_run, tmp_path):
    out, _ = smoke_run
    plan, _ = reproduce.plan_from_args([*TASK, "--scale", "smoke", "--out", str(out), "--device", "cpu"])
    # load_file maps the file: clone before the file is overwritten below
    finished = {name: t.clone() for name, t in load_file(str(out / "train" / "checkpoint.safetensors")).items()}
    # The state a killed run leaves: a checkpoint halfway, and a record that says "running".
    halfway = train(dataclasses.replace(plan.train_config(), steps=3, out=str(tmp_path / "halfway")))
    shutil.copyfile(halfway, out / "train" / "checkpoint.safetensors")
    record_path = out / "train" / "stage.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "status": "running"}))

    printed = run_in_process(out, "--until", "train")
    assert "[generate] done earlier" in printed and "[train] resuming (attempt 2)" in printed
    resumed = load_file(str(out / "train" / "checkpoint.safetensors"))
    assert resumed.keys() == finished.keys()
    for name in finished:  # bit for bit: weights and optimizer state (so later stages still match it)
        torch.testing.assert_close(resumed[name], finished[name], rtol=0, atol=0)
    assert json.loads(record_path.read_text())["status"] == "done"


def test_changed_settings_are_refused_and_redo_discards(smoke_run, tmp_path):
    out, _ = smoke_run
    changed = {**SMOKE, "training": {**SMOKE["training"], "steps": 7, "lr": 0.001}}
    scale = tmp_path / "smoke-changed.yaml"
    scale.write_text(yaml.safe_dump(changed))
    with pytest.raises(SystemExit) as refusal:
        run_in_process(out, scale=str(scale))
    message = str(refusal.value)
    assert message.startswith("cfgrl-reproduce: error: ")
    assert "train:" in message and "training.steps: 6 -> 7" in message and "training.lr: 0.0003 -> 0.001" in message
    assert "--redo train" in message

    before = mtimes(out)
    printed = run_in_process(out, "--redo", "report")
    assert "[evaluate] done earlier" in printed and "[report] running" in printed
    assert mtimes(out)["report/report.md"] != before["report/report.md"]


def test_image_goals_share_the_dataset(smoke_run, tmp_path):
    out, _ = smoke_run
    printed = run_in_process(tmp_path / "image", "--data-dir", str(out / "data"), "--goal-mode", "image",
                             "--until", "train")
    assert "[generate] done earlier" in printed and "[train] running" in printed
    from cfgrl_ros.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "image" / "train" / "checkpoint.safetensors").config.goal_mode == "image"


# ---------------------------------------------------------------------------------------------
# Scales, refusals and the computed verdict (no simulation).


def test_the_named_scales():
    scales = {name: reproduce.load_scale(name) for name in ("paper", "gpu-1h", "device-10min", "smoke")}
    paper = scales["paper"]
    assert (paper.dataset["num_episodes"], paper.dataset["episode_length"]) == (1000, 1001)
    assert (paper.training["steps"], paper.training["batch_size"]) == (500_000, 256)
    assert paper.evaluation["episodes_per_task"] == 50 and paper.evaluation["tasks"] == [1, 2, 3, 4, 5]
    for name, scale in scales.items():  # the sweep; the one-call GPU scale keeps 0, 1 and 3
        assert scale.evaluation["ws"] == ([0, 1, 3] if name == "device-10min" else [0, 1, 1.5, 2, 3, 4]), name
        plan = reproduce.Plan("visual-cube-single", "oracle", scale, Path("/tmp/x"), Path("/tmp/x/data"), "cpu")
        plan.generation_config()  # valid settings
        plan.train_config()
    assert set(reproduce.available_scales()) >= {"paper", "gpu-1h", "device-10min", "smoke"}


def test_bad_scales_are_refused_with_a_reason(tmp_path):
    with pytest.raises(reproduce.ReproduceError, match="unknown scale 'huge'.*'smoke'"):
        reproduce.load_scale("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SMOKE, "training": {**SMOKE["training"], "stepz": 3}}))
    with pytest.raises(reproduce.ReproduceError, match=r"unknown training settings \['stepz'\]"):
        reproduce.load_scale(str(bad))
    bad.write_text(yaml.safe_dump({**SMOKE, "evaluation": {**SMOKE["evaluation"], "ws": [0, 1, 2]}}))
    with pytest.raises(reproduce.ReproduceError, match="must include w=1 and w=3"):
        reproduce.load_scale(str(bad))
    bad.write_text(yaml.safe_dump({k: v for k, v in SMOKE.items() if k != "dataset"}))
    with pytest.raises(reproduce.ReproduceError, match="'dataset' is missing"):
        reproduce.load_scale(str(bad))
    with pytest.raises(SystemExit, match="--workers must be >= 0"):
        reproduce.main([*TASK, "--scale", "smoke", "--workers", "-1"])


def episodes_with(successes: dict[float, int], per_task: int = 50) -> list[dict]:
    """Episode records for tasks 1-5 where the first successes[w] episodes (task-major) succeed."""
    records = []
    for w, count in successes.items():
        for index in range(5 * per_task):
            task, episode = divmod(index, per_task)
            records.append(dict(w=w, task=task + 1, episode=episode, success=index < count))
    return records


@pytest.mark.parametrize("gcbc, cfgrl, ratio_met, separated", [
    (33, 93, True, True),    # 13% -> 37%, the paper's figures: met
    (33, 60, False, True),   # 13% -> 24%: intervals separate, but less than 2x
    (33, 45, False, False),  # 13% -> 18%: less than 2x, intervals overlap
    (5, 12, True, False),    # 2% -> 4.8%: 2.4x, but the intervals overlap
    (0, 0, False, False),    # nothing succeeds: not met (0 >= 2 x 0 does not count)
])
def test_the_verdict_is_computed_from_the_episodes(gcbc, cfgrl, ratio_met, separated):
    results = summarize(episodes_with({1.0: gcbc, 3.0: cfgrl}))
    comparison = reproduce.compare(results)
    assert comparison["ratio_met"] is ratio_met and comparison["cis_separated"] is separated
    assert comparison["target_met"] is (ratio_met and separated)
    assert comparison["baseline"]["episodes"] == comparison["guided"]["episodes"] == 250
    assert comparison["only_guided"] == max(cfgrl - gcbc, 0) and comparison["pairs"] == 250
    assert (comparison["ratio"] is None) == (gcbc == 0)
    if gcbc:
        assert comparison["ratio"] == pytest.approx(cfgrl / gcbc)


def test_stale_message_names_every_changed_input():
    old = {"dataset": "abc", "training": {"steps": 6, "lr": 0.0003}}
    new = {"dataset": "abd", "training": {"steps": 6, "lr": 0.001}}
    assert reproduce.input_differences(old, new) == ["dataset: 'abc' -> 'abd'", "training.lr: 0.0003 -> 0.001"]
    assert reproduce.hash_inputs(old) != reproduce.hash_inputs(new)
    assert reproduce.hash_inputs({"a": 1, "b": [2]}) == reproduce.hash_inputs({"b": [2], "a": 1})
