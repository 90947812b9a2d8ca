"""cfgrl-export on a tiny random checkpoint: ONNX and the torch.export program against eager PyTorch."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnxruntime
import pytest
import torch

from cfgrl_ros.checkpoint import load_checkpoint, save_checkpoint
from cfgrl_ros.engines import INPUT_NAMES, TENSORRT_MISSING, example_inputs
from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig
from cfgrl_ros.sampler import GuidedSampler
from training import export
from training.export import ExportError, export_checkpoint, main, verify_onnx

FLOW_STEPS = 4
TOLERANCE = 1e-4  # fp32 actions, max abs difference


def tiny_config(goal_mode: str) -> PolicyConfig:
    return PolicyConfig(action_dim=3, goal_mode=goal_mode, goal_dim=2, image_size=16, encoder_channels=(4, 8),
                        encoder_dim=32, hidden_dims=(32, 32))


@pytest.fixture(scope="module", params=["oracle", "image"])
def exported(request, tmp_path_factory):
    """(checkpoint path, artifacts dir) after running the CLI once per goal mode."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = save_checkpoint(root / "ckpt.safetensors", CFGRLPolicy(tiny_config(request.param)))
    out = root / "artifacts"
    assert main([str(checkpoint), "--out", str(out), "--flow-steps", str(FLOW_STEPS),
                 "--formats", "pt2,onnx", "--max-batch", "16"]) == 0
    return checkpoint, out


def eager(checkpoint, inputs):
    sampler = GuidedSampler(load_checkpoint(checkpoint).policy)
    with torch.inference_mode():
        return sampler(*inputs, FLOW_STEPS)


def guided_inputs(config, batch_size, seed=1):
    observations, goals, _, noise = example_inputs(config, batch_size, seed=seed)
    return observations, goals, torch.linspace(0.0, 3.0, batch_size), noise


def test_artifacts_are_named_by_flow_steps_and_described(exported):
    checkpoint, out = exported
    manifest = json.loads((out / f"manifest_k{FLOW_STEPS}.json").read_text())
    assert manifest["artifacts"] == {"pt2": "sampler_k4.pt2", "onnx": "sampler_k4.onnx"}
    assert manifest["model_sha256"] == load_checkpoint(checkpoint).metadata["sha256"]
    sidecar = json.loads((out / "sampler_k4.onnx.json").read_text())
    assert sidecar["flow_steps"] == FLOW_STEPS and sidecar["inputs"] == list(INPUT_NAMES)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnx_matches_pytorch_and_takes_w_as_input(exported, batch_size):
    checkpoint, out = exported
    session = onnxruntime.InferenceSession(str(out / "sampler_k4.onnx"), providers=["CPUExecutionProvider"])
    inputs = guided_inputs(load_checkpoint(checkpoint).config, batch_size)
    for w in (inputs[2], inputs[2] + 2.0):  # w is an input, not a constant of the graph
        inputs = inputs[:2] + (w,) + inputs[3:]
        (actual,) = session.run(None, {name: x.numpy() for name, x in zip(INPUT_NAMES, inputs)})
        np.testing.assert_allclose(actual, eager(checkpoint, inputs).numpy(), rtol=0, atol=TOLERANCE)
    assert not np.allclose(actual, session.run(None, {name: x.numpy() for name, x in
                                                      zip(INPUT_NAMES, inputs[:2] + (w * 0,) + inputs[3:])})[0])


@pytest.mark.parametrize("batch_size", [1, 5])
def test_pt2_program_loads_and_matches(exported, batch_size):
    checkpoint, out = exported
    program = torch.export.load(str(out / "sampler_k4.pt2"))
    inputs = guided_inputs(load_checkpoint(checkpoint).config, batch_size)
    with torch.inference_mode():
        actual = program.module()(*inputs)
    torch.testing.assert_close(actual, eager(checkpoint, inputs), rtol=0, atol=TOLERANCE)


def test_onnx_check_catches_a_model_that_differs(exported):
    checkpoint, out = exported
    other = GuidedSampler(CFGRLPolicy(load_checkpoint(checkpoint).config).eval())
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify_onnx(out / "sampler_k4.onnx", other, FLOW_STEPS)


def test_an_onnx_file_that_fails_its_check_is_not_kept(exported, tmp_path, monkeypatch, capsys):
    checkpoint, _ = exported
    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)  # no export can pass
    assert main([str(checkpoint), "--out", str(tmp_path / "out"), "--flow-steps", "2", "--formats", "onnx"]) == 2
    assert "differs from PyTorch" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor its temporary
    (tmp_path / "file").write_text("")
    assert main([str(checkpoint), "--out", str(tmp_path / "file"), "--formats", "fp16"]) == 2  # not a directory
    assert "cfgrl-export: error:" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main([str(garbage), "--formats", "onnx"]) == 2
    assert "not a readable safetensors checkpoint" in capsys.readouterr().err

    good = save_checkpoint(tmp_path / "ckpt.safetensors", CFGRLPolicy(tiny_config("oracle")))
    data = bytearray(good.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the last tensor
    good.write_bytes(bytes(data))
    assert main([str(good)]) == 2
    assert "is corrupt" in capsys.readouterr().err
    assert not (tmp_path / "ckpt.export").exists()


def test_unknown_format_is_a_clear_error(tmp_path, capsys):
    good = save_checkpoint(tmp_path / "ckpt.safetensors", CFGRLPolicy(tiny_config("oracle")))
    assert main([str(good), "--formats", "onnx,tflite"]) == 2
    assert "unknown or no formats ['tflite']" in capsys.readouterr().err
    assert main([str(good), "--formats", ","]) == 2
    assert "unknown or no formats []" in capsys.readouterr().err
    assert main([str(good), "--max-batch", "1"]) == 2
    assert "max_batch >= 2" in capsys.readouterr().err
    assert main([str(good), "--flow-steps", "-2", "--formats", "fp16"]) == 2
    assert not (tmp_path / "ckpt.export").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available(),
                    reason="checks the refusal where TensorRT cannot run")
def test_tensorrt_named_in_formats_is_required(tmp_path, capsys):
    good = save_checkpoint(tmp_path / "ckpt.safetensors", CFGRLPolicy(tiny_config("oracle")))
    assert main([str(good), "--formats", "fp16,tensorrt"]) == 2
    assert "cannot build TensorRT here" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None or not torch.cuda.is_available(),
                    reason=TENSORRT_MISSING if importlib.util.find_spec("torch_tensorrt") is None
                    else "TensorRT needs a CUDA GPU")
def test_tensorrt_program_is_saved_with_its_cache_key(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "ckpt.safetensors", CFGRLPolicy(tiny_config("oracle")))
    written = export_checkpoint(checkpoint, tmp_path / "out", FLOW_STEPS, ("tensorrt",), max_batch=8)
    key = json.loads(written["tensorrt"].with_name(written["tensorrt"].name + ".json").read_text())
    assert key["precision"] == "fp16" and key["flow_steps"] == FLOW_STEPS
    assert {"tensorrt", "torch_tensorrt", "gpu", "compute_capability", "model_sha256", "shapes"} <= set(key)


def test_fp16_checkpoint_keeps_the_policy_and_its_metadata_at_a_third_of_the_size(tmp_path):
    torch.manual_seed(0)
    policy = CFGRLPolicy(tiny_config("oracle"))
    optimizer_state = {"exp_avg": torch.randn(1000, 100)}  # what a training checkpoint carries beside the policy
    source = save_checkpoint(tmp_path / "ckpt.safetensors", policy, dataset_fingerprint="abc", step=7,
                             train_state=optimizer_state, extra_metadata={"train_config": '{"steps": 7}'})
    assert main([str(source), "--out", str(tmp_path / "out"), "--formats", "fp16"]) == 0
    path = tmp_path / "out" / "policy_fp16.safetensors"
    compact, original = load_checkpoint(path), load_checkpoint(source)
    assert path.stat().st_size < source.stat().st_size / 3
    assert compact.train_state == {}
    assert {k: compact.metadata[k] for k in ("dataset_fingerprint", "step", "train_config", "goal_mode")} == \
        {"dataset_fingerprint": "abc", "step": "7", "train_config": '{"steps": 7}', "goal_mode": "oracle"}
    for name, weight in original.policy.state_dict().items():
        loaded = compact.policy.state_dict()[name]
        assert loaded.dtype == weight.dtype  # float32 again once loaded
        torch.testing.assert_close(loaded, weight.half().to(weight.dtype), rtol=0, atol=0)
    inputs = guided_inputs(original.config, 4)
    torch.testing.assert_close(eager(path, inputs), eager(source, inputs), rtol=0, atol=5e-3)


def test_an_fp16_copy_that_would_overflow_is_refused(tmp_path, capsys):
    policy = CFGRLPolicy(tiny_config("oracle"))
    with torch.no_grad():
        next(policy.parameters()).view(-1)[0] = 1e6  # beyond float16's largest value, 65504
    source = save_checkpoint(tmp_path / "ckpt.safetensors", policy)
    assert main([str(source), "--out", str(tmp_path / "out"), "--formats", "fp16"]) == 2
    assert "beyond float16's range" in capsys.readouterr().err
    assert not (tmp_path / "out" / "policy_fp16.safetensors").exists()


def test_exports_with_other_formats_add_to_the_manifest(tmp_path):
    source = save_checkpoint(tmp_path / "ckpt.safetensors", CFGRLPolicy(tiny_config("oracle")))
    out = tmp_path / "out"
    assert main([str(source), "--out", str(out), "--formats", "fp16", "--flow-steps", "2"]) == 0
    assert main([str(source), "--out", str(out), "--formats", "pt2", "--flow-steps", "2", "--max-batch", "4"]) == 0
    manifest = json.loads((out / "manifest_k2.json").read_text())
    assert sorted(manifest["artifacts"]) == ["fp16", "pt2"]
    other = save_checkpoint(tmp_path / "other.safetensors", CFGRLPolicy(tiny_config("oracle")))
    assert main([str(other), "--out", str(out), "--formats", "fp16", "--flow-steps", "2"]) == 0
    assert sorted(json.loads((out / "manifest_k2.json").read_text())["artifacts"]) == ["fp16"]  # another model
