"""Every engine against eager PyTorch on the same inputs and noise, plus the fallback contract.

Tolerances (max abs difference of actions in [-1, 1]): fp32 engines 1e-4; the CUDA graph 1e-3
(cuDNN may pick other conv algorithms, TF32 convs by default); TensorRT fp16 5e-2.
Models are tiny so that ONNX export and torch.compile stay within seconds on a 2-core CPU.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json

import pytest
import torch

from cfgrl_ros.checkpoint import load_checkpoint, save_checkpoint
from cfgrl_ros.engines import (
    AUTO_ORDER,
    TENSORRT_MISSING,
    EngineUnavailable,
    TorchEngine,
    artifact_path,
    check_cache_key,
    default_artifacts_dir,
    example_inputs,
    load_engine,
    onnx_artifact,
)
from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig
from cfgrl_ros.sampler import GuidedSampler

FP32_TOLERANCE = 1e-4
CUDA_GRAPH_TOLERANCE = 1e-3
FP16_TOLERANCE = 5e-2
HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none on this machine")
needs_tensorrt = pytest.mark.skipif(not (HAS_TENSORRT and HAS_CUDA),
                                    reason=TENSORRT_MISSING if not HAS_TENSORRT else "needs a CUDA GPU")


def tiny_config(goal_mode: str) -> PolicyConfig:
    return PolicyConfig(action_dim=3, goal_mode=goal_mode, goal_dim=2, image_size=16, encoder_channels=(4, 8),
                        encoder_dim=32, hidden_dims=(32, 32))


def tiny_checkpoint(goal_mode: str, directory):
    torch.manual_seed(0)
    return save_checkpoint(directory / "ckpt.safetensors", CFGRLPolicy(tiny_config(goal_mode)))


@pytest.fixture(scope="module", params=["oracle", "image"])
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def oracle_checkpoint(tmp_path_factory):
    """One goal mode for torch.compile, which takes tens of seconds per model on 2 cores."""
    return tiny_checkpoint("oracle", tmp_path_factory.mktemp("compiled"))


def guided_inputs(config: PolicyConfig, batch_size: int, seed: int = 1, device: str = "cpu"):
    """Per-sample w spanning flow BC (0), GCBC (1) and CFGRL (>1)."""
    observations, goals, _, noise = example_inputs(config, batch_size, device=device, seed=seed)
    return observations, goals, torch.linspace(0.0, 3.0, batch_size, device=device), noise


def eager_actions(path, inputs, flow_steps, device="cpu"):
    return load_engine(path, "torch", device).infer(*inputs, flow_steps)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_onnxruntime_matches_eager(checkpoint, batch_size):
    engine = load_engine(checkpoint, "onnxruntime", flow_steps=4)
    inputs = guided_inputs(engine.config, batch_size)
    for flow_steps in (4, 2):  # a second step count is exported lazily
        actual = engine.infer(*inputs, flow_steps)
        torch.testing.assert_close(actual, eager_actions(checkpoint, inputs, flow_steps), rtol=0, atol=FP32_TOLERANCE)
    assert artifact_path(default_artifacts_dir(checkpoint), "onnx", 2).is_file()


def test_onnxruntime_rejects_bad_shapes(checkpoint):
    engine = load_engine(checkpoint, "onnxruntime", flow_steps=4)
    observations, goals, w, noise = guided_inputs(engine.config, 2)
    with pytest.raises(ValueError, match="noise must be float"):
        engine.infer(observations, goals, w, noise[:, :1], 4)
    with pytest.raises(ValueError, match="observations must be .* uint8, got torch.float32"):  # not cast to zeros
        engine.infer(observations.float() / 255, goals, w, noise, 4)


def test_concurrent_onnx_exports_both_succeed(oracle_checkpoint, tmp_path):
    """Two quick flow_steps changes in the node export from two threads at once; torch.export allows one."""
    checkpoint = load_checkpoint(oracle_checkpoint)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda k: onnx_artifact(checkpoint, k, tmp_path), (2, 3, 2)))
    assert paths == [artifact_path(tmp_path, "onnx", k) for k in (2, 3, 2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sampler_k2.onnx", "sampler_k2.onnx.json",
                                                          "sampler_k3.onnx", "sampler_k3.onnx.json"]


def test_compiled_matches_eager_and_w_or_steps_never_recompile(oracle_checkpoint):
    checkpoint = oracle_checkpoint
    engine = load_engine(checkpoint, "compiled", flow_steps=4)  # compiles for batch 1 while warming up
    inputs = guided_inputs(engine.config, 1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for w, flow_steps in ((0.0, 4), (2.5, 4), (7.0, 3)):
            inputs = inputs[:2] + (torch.full((1,), w),) + inputs[3:]
            actual = engine.infer(*inputs, flow_steps)
            torch.testing.assert_close(actual, eager_actions(checkpoint, inputs, flow_steps),
                                       rtol=0, atol=FP32_TOLERANCE)
    batch = guided_inputs(engine.config, 4)
    torch.testing.assert_close(engine.infer(*batch, 4), eager_actions(checkpoint, batch, 4),
                               rtol=0, atol=FP32_TOLERANCE)


def test_auto_on_cpu_returns_a_working_engine(checkpoint, caplog):
    with caplog.at_level("INFO", logger="cfgrl_ros.engines"):
        engine = load_engine(checkpoint, "auto", "cpu", flow_steps=4)
    assert engine.name == AUTO_ORDER["cpu"][0]
    assert f"auto: chose {engine.name}" in caplog.text
    inputs = guided_inputs(engine.config, 4)
    torch.testing.assert_close(engine.infer(*inputs, 4), eager_actions(checkpoint, inputs, 4),
                               rtol=0, atol=FP32_TOLERANCE)


def test_auto_goes_on_past_an_engine_that_breaks(tmp_path, caplog):
    """A damaged ONNX artifact (its cache key intact) makes onnxruntime fail with its own error, not
    EngineUnavailable: auto must log it and take the next engine."""
    path = tiny_checkpoint("oracle", tmp_path)
    load_engine(path, "onnxruntime", "cpu", flow_steps=4)  # exports sampler_k4.onnx and its key
    onnx = artifact_path(default_artifacts_dir(path), "onnx", 4)
    onnx.write_bytes(onnx.read_bytes()[:200])
    with caplog.at_level("INFO", logger="cfgrl_ros.engines"):
        engine = load_engine(path, "auto", "cpu", flow_steps=4)
    assert engine.name == "torch" and "auto: onnxruntime failed" in caplog.text
    with pytest.raises(Exception) as raised:  # asked for by name, the failure is the caller's to see
        load_engine(path, "onnxruntime", "cpu", flow_steps=4)
    assert not isinstance(raised.value, EngineUnavailable)


def test_an_onnx_artifact_from_other_sampler_code_is_exported_again(tmp_path, caplog):
    path = tiny_checkpoint("oracle", tmp_path)
    load_engine(path, "onnxruntime", "cpu", flow_steps=2)
    sidecar = artifact_path(default_artifacts_dir(path), "onnx", 2).with_suffix(".onnx.json")
    key = json.loads(sidecar.read_text())
    assert len(key["sampler_code_sha256"]) == 64
    sidecar.write_text(json.dumps(dict(key, sampler_code_sha256="0" * 64)))  # made by older code
    with caplog.at_level("INFO", logger="cfgrl_ros.engines"):
        load_engine(path, "onnxruntime", "cpu", flow_steps=2)
    assert "refreshing stale ONNX export" in caplog.text
    assert json.loads(sidecar.read_text())["sampler_code_sha256"] == key["sampler_code_sha256"]


def test_unknown_backend_is_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match=r"unknown backend 'tensorflow'; available: torch, compiled"):
        load_engine(checkpoint, "tensorflow")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("backend", ["cuda_graph", "tensorrt", "torch", "compiled", "auto"])
def test_gpu_backends_refuse_to_run_here(checkpoint, backend):
    with pytest.raises(EngineUnavailable, match="CUDA|torch-tensorrt is not installed|no engine can run on cuda"):
        load_engine(checkpoint, backend, "cuda")


def test_tensorrt_cache_key_mismatch_names_every_difference(tmp_path):
    key = {"model_sha256": "abc", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "precision": "fp16"}
    check_cache_key(key, dict(key), tmp_path / "p.ep")  # the same key passes
    check_cache_key(dict(key, max_batch=1024), dict(key, max_batch=16), tmp_path / "p.ep")  # any batch range serves
    stale = dict(key, gpu="NVIDIA A100-SXM4-40GB", compute_capability="8.0")
    with pytest.raises(EngineUnavailable, match=r"gpu: built for 'NVIDIA A100.*compute_capability: built for '8.0'"):
        check_cache_key(key, stale, tmp_path / "p.ep")
    with pytest.raises(EngineUnavailable, match="no readable cache key"):
        check_cache_key(key, None, tmp_path / "p.ep")


# --- GPU engines: run on the GPU machine, skipped here ---------------------------------------------

@needs_cuda
@pytest.mark.parametrize("batch_size", [1, 4])
def test_cuda_graph_matches_eager_without_recapture(checkpoint, batch_size):
    engine = load_engine(checkpoint, "cuda_graph", "cuda", flow_steps=4)
    reference = TorchEngine(GuidedSampler(CFGRLPolicy(engine.config)), "cuda")
    reference.sampler.load_state_dict(engine.sampler.state_dict())
    for seed, flow_steps in ((1, 4), (2, 8), (3, 5)):  # new w, noise and step counts: same graphs
        inputs = guided_inputs(engine.config, batch_size, seed, "cuda")
        inputs = inputs[:2] + (inputs[2] * seed,) + inputs[3:]
        actual = engine.infer(*inputs, flow_steps)
        torch.testing.assert_close(actual, reference.infer(*inputs, flow_steps), rtol=0, atol=CUDA_GRAPH_TOLERANCE)
    assert sorted(engine._graphs) == sorted({1, batch_size})


@needs_cuda
def test_cuda_graph_buckets_shrinking_batches_and_casts_inputs(checkpoint):
    """An evaluator's batch shrinks as episodes end: sizes share power-of-two buckets, padding changes no row."""
    engine = load_engine(checkpoint, "cuda_graph", "cuda", flow_steps=4)
    reference = load_engine(checkpoint, "torch", "cuda")
    for batch_size in (7, 6, 5, 3, 2, 1):
        inputs = guided_inputs(engine.config, batch_size, seed=batch_size, device="cuda")
        torch.testing.assert_close(engine.infer(*inputs, 16), reference.infer(*inputs, 16),
                                   rtol=0, atol=CUDA_GRAPH_TOLERANCE)
    assert sorted(engine._graphs) == [1, 2, 4, 8]
    observations, goals, w, noise = guided_inputs(engine.config, 3, device="cuda")
    torch.testing.assert_close(engine.infer(observations, goals, w.double(), noise.double(), 4),
                               reference.infer(observations, goals, w, noise, 4), rtol=0, atol=CUDA_GRAPH_TOLERANCE)


@needs_cuda
def test_cuda_graph_result_survives_the_next_call(checkpoint):
    engine = load_engine(checkpoint, "cuda_graph", "cuda", flow_steps=4)
    first_inputs = guided_inputs(engine.config, 2, seed=1, device="cuda")
    first = engine.infer(*first_inputs, 4)
    kept = first.clone()
    engine.infer(*guided_inputs(engine.config, 2, seed=2, device="cuda"), 4)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


@needs_tensorrt
def test_tensorrt_fp16_matches_eager_and_replaces_a_stale_program(checkpoint):
    engine = load_engine(checkpoint, "tensorrt", "cuda", flow_steps=4, tensorrt_max_batch=8)
    for batch_size in (1, 4):
        inputs = guided_inputs(engine.config, batch_size, device="cuda")
        torch.testing.assert_close(engine.infer(*inputs, 4), eager_actions(checkpoint, inputs, 4, "cuda"),
                                   rtol=0, atol=FP16_TOLERANCE)
    with pytest.raises(ValueError, match="batches of at most 8"):
        engine.infer(*guided_inputs(engine.config, 9, device="cuda"), 4)
    # Loaded with the default range (1024), the program built for 1..8 is used, not refused.
    assert load_engine(checkpoint, "tensorrt", "cuda", flow_steps=4).max_batch == 8
    observations, goals, w, noise = guided_inputs(engine.config, 2, device="cuda")
    if engine.config.goal_mode == "oracle":  # every engine casts float goals; float64 must not reach the program
        torch.testing.assert_close(engine.infer(observations, goals.double(), w, noise, 4),
                                   engine.infer(observations, goals, w, noise, 4), rtol=0, atol=0)
    sidecar = artifact_path(default_artifacts_dir(checkpoint), "tensorrt", 4).with_suffix(".ep.json")
    key = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(key, gpu="some other GPU")))
    # auto never builds: it passes over the stale program; tensorrt named explicitly builds a fitting one.
    assert load_engine(checkpoint, "auto", "cuda", flow_steps=4, tensorrt_max_batch=8).name == "cuda_graph"
    assert load_engine(checkpoint, "tensorrt", "cuda", flow_steps=4, tensorrt_max_batch=8).name == "tensorrt"
    assert json.loads(sidecar.read_text())["gpu"] == key["gpu"]
