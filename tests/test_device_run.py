"""scripts/device_run.sh rehearsed on this CPU: the headline's whole chain (reproduce at the smoke scale,
the fp16 export, the files that come back), as the GPU machine would run it at the device-10min scale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from cfgrl_ros.checkpoint import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "device_run.sh"


def rehearse(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEVICE_REHEARSAL": "1", "OUT": str(tmp_path / "out"),
           "DEVICE_RUN_DIR": str(tmp_path / "run"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *arguments], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_headline_rehearsal_brings_back_the_report_and_an_fp16_policy(tmp_path):
    result = rehearse(tmp_path, "headline")
    out = tmp_path / "out"
    assert result.returncode == 0, result.stderr + (out / "device.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["device.log", "figures.md", "report.md", "success_vs_w.png", "comparison.json", "policy-fp16.safetensors"])
    figures = (out / "figures.md").read_text()
    for stage in ("generate", "train", "report"):  # one step per stage, and each stage's figures
        assert f"- step `headline-{stage}`: exit 0" in figures, figures
    assert "- step `export-fp16`: exit 0" in figures
    assert "- stage generate: done" in figures and "transitions_per_second" in figures
    assert "- stage train: done" in figures and "mean_steps_per_s" in figures
    assert "scale `smoke`" in (out / "report.md").read_text()

    trained = tmp_path / "run" / "visual-cube-single-oracle" / "train" / "checkpoint.safetensors"
    policy = out / "policy-fp16.safetensors"
    with safe_open(str(policy), framework="pt") as handle:
        assert {str(handle.get_tensor(k).dtype) for k in handle.keys() if "weight" in k} == {"torch.float16"}
    assert load_checkpoint(policy).metadata["dataset_fingerprint"] == load_checkpoint(trained).metadata["dataset_fingerprint"]
    assert policy.stat().st_size < trained.stat().st_size / 2  # no optimizer state, half-width floats
    assert (tmp_path / "run" / "data" / "visual-cube-single-play-v0.npz").is_file()  # where `headline image` looks


def test_check_is_refused_off_the_gpu_machine_and_parts_are_checked(tmp_path):
    result = rehearse(tmp_path, "check")
    assert result.returncode == 2 and "check needs the GPU" in result.stderr
    for arguments in (("headline", "goals"), ("train",)):
        result = rehearse(tmp_path, *arguments)
        assert result.returncode == 2 and "usage:" in result.stderr and "headline [oracle|image]" in result.stderr
    assert not (tmp_path / "run").exists()
