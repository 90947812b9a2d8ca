"""Inference engines: one small interface over eager PyTorch and its compiled forms.

Every engine runs the whole guided sampler (encode once, `flow_steps` guided Euler steps, clip) and
takes the same runtime inputs: uint8 observations (B, H, W, 3), goals, w (B,) and noise
(B, action_dim), so the node and the evaluators never care which one they hold.

Backends: torch (eager), compiled (torch.compile), onnxruntime (the ONNX export), cuda_graph (one
CUDA graph for the encoder and one for a single Euler step, replayed), tensorrt (torch-tensorrt
fp16 program built from the torch.export program), and auto (the fastest that can run here).
A backend that cannot run on this machine raises EngineUnavailable, so a caller can fall back.

Exported artifacts (ONNX, TensorRT) unroll a fixed number of flow steps; they live in an artifacts
directory beside the checkpoint (`ckpt.safetensors` -> `ckpt.export/`), each with a JSON sidecar
that says what it was built from.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from cfgrl_ros.checkpoint import Checkpoint, load_checkpoint
from cfgrl_ros.policy import PolicyConfig
from cfgrl_ros.sampler import GuidedSampler, check_sampler_inputs, flow_times

log = logging.getLogger(__name__)

BACKENDS = ("torch", "compiled", "onnxruntime", "cuda_graph", "tensorrt")
# Fastest first. CPU order measured at batch 1, 16 steps on the 2-core dev machine (see
# docs/benchmarks.md): onnxruntime with one intra-op thread beats eager torch ~2-3x there, and
# torch.compile gains little over eager while costing a minute of compilation.
AUTO_ORDER = {"cuda": ("tensorrt", "cuda_graph", "compiled", "torch"), "cpu": ("onnxruntime", "torch")}
INPUT_NAMES = ("observations", "goals", "w", "noise")
# torch.export and the ONNX exporter keep global tracing state: two exports at once (two quick
# flow_steps changes in the node) both fail. One at a time per process.
EXPORT_LOCK = threading.Lock()
TENSORRT_MISSING = ("torch-tensorrt is not installed: the package index only has stubs that fetch from "
                    "NVIDIA's own index")


class EngineUnavailable(RuntimeError):
    """This backend cannot run here (missing package, no CUDA, stale artifact): fall back to another."""


class Engine(Protocol):
    name: str
    config: PolicyConfig
    device: torch.device
    # infer() takes any flow_steps as it is; False: another count needs an export or a build first.
    any_flow_steps: bool

    def infer(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
              flow_steps: int) -> torch.Tensor:
        """Guided actions (B, action_dim) on the engine's device."""


class TorchEngine:
    """Eager PyTorch on any device: the reference every other engine is checked against."""

    name = "torch"
    any_flow_steps = True

    def __init__(self, sampler: GuidedSampler, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.sampler = sampler.to(self.device).eval()
        self.config = sampler.policy.config

    @torch.inference_mode()
    def infer(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
              flow_steps: int) -> torch.Tensor:
        return self.sampler(observations.to(self.device), goals.to(self.device), w.to(self.device),
                            noise.to(self.device), flow_steps)


class CompiledEngine:
    """torch.compile of the encoder and of one Euler step; the step loop stays in Python.

    t, dt and w are tensors and flow_steps only sets the loop length, so changing any of them never
    recompiles. The first new batch sizes recompile (dynamo then marks the batch dimension dynamic;
    the encoder's convolutions may specialise once more at larger batches). Inductor's FX graph cache
    (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) makes later loads fast.
    """

    name = "compiled"
    any_flow_steps = True

    def __init__(self, sampler: GuidedSampler, device: str | torch.device = "cpu", mode: str | None = None):
        self.device = torch.device(device)
        self.sampler = sampler.to(self.device).eval()
        self.config = sampler.policy.config
        self.mode = mode
        self._encode = torch.compile(self.sampler.encode, mode=mode)
        self._step = torch.compile(self.sampler.euler_step, mode=mode)
        log.info("compiled engine: torch.compile(mode=%s), inductor cache %s", mode or "default", inductor_cache_dir())

    @torch.inference_mode()
    def infer(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
              flow_steps: int) -> torch.Tensor:
        check_sampler_inputs(observations, goals, w, noise, flow_steps, self.config)
        condition = self._encode(observations.to(self.device), goals.to(self.device))
        # copy: the caller's tensor was made outside inference mode, which would fail dynamo's guards
        # on the first step and compile a second graph for it.
        actions, w = noise.to(self.device, condition.dtype, copy=True), w.to(self.device)
        dt = torch.tensor(1.0 / flow_steps, device=self.device)
        times = flow_times(flow_steps, self.device)  # one host-to-device copy, not one per step
        for i in range(flow_steps):
            actions = self._step(condition, actions, times[i], dt, w)
        return actions.clamp(-1.0, 1.0)


class CudaGraphEngine:
    """Two CUDA graphs per batch bucket: the encoder, and one guided Euler step replayed flow_steps times.

    Inputs, w, the step index, dt and the actions live in static buffers; the step graph updates the
    actions and the step index in place (t = index * dt, one fp32 rounding from i/K at any step
    count), so w, the noise and flow_steps change without recapture. Batches are padded up to a
    power of two, so an evaluator whose batch shrinks as episodes end captures log2(B) buckets,
    not one pair of graphs per size.
    """

    name = "cuda_graph"
    any_flow_steps = True

    def __init__(self, sampler: GuidedSampler, device: str | torch.device = "cuda"):
        self.device = _cuda_device(device, "cuda_graph")
        self.sampler = sampler.to(self.device).eval()
        self.config = sampler.policy.config
        self._graphs: dict[int, _CapturedSampler] = {}

    @torch.inference_mode()
    def infer(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
              flow_steps: int) -> torch.Tensor:
        check_sampler_inputs(observations, goals, w, noise, flow_steps, self.config)
        batch_size = observations.shape[0]
        bucket = 1 << (batch_size - 1).bit_length()  # the next power of two
        inputs = tuple(_pad_rows(x.to(self.device), bucket) for x in (observations, goals, w, noise))
        if bucket not in self._graphs:
            log.info("cuda_graph: capturing encoder and Euler-step graphs for batches up to %d", bucket)
            self._graphs[bucket] = _CapturedSampler(self.sampler, inputs)
        return self._graphs[bucket].run(*inputs, flow_steps)[:batch_size]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with its first row repeated up to `rows` rows (rows are independent: padding changes no result)."""
    return x if x.shape[0] == rows else torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


class _CapturedSampler:
    def __init__(self, sampler: GuidedSampler, inputs: tuple[torch.Tensor, ...]):
        device = next(sampler.parameters()).device
        dtype = next(sampler.parameters()).dtype
        observations, goals, w, noise = inputs
        # Fixed dtypes: copy_ casts every later call's inputs into them (checked uint8 images by then).
        self.observations = observations.to(device, torch.uint8, copy=True)
        self.goals = goals.to(device, torch.uint8 if sampler.config.goal_mode == "image" else dtype, copy=True)
        self.w, self.actions = w.to(device, dtype, copy=True), noise.to(device, dtype, copy=True)
        self.step_index = torch.zeros((), device=device)
        self.dt = torch.full((), 1.0 / 16, device=device)
        encode = lambda: sampler.encode(self.observations, self.goals)  # noqa: E731

        def step() -> None:
            t = self.step_index * self.dt
            self.actions.copy_(sampler.euler_step(self.condition, self.actions, t, self.dt, self.w))
            self.step_index.add_(1.0)

        # Warm up on a side stream before capture, as the CUDA-graph docs require (lazy init, autotuning).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.condition = encode()
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        # One memory pool for the two graphs of this batch size, captured and always replayed in
        # this order, so the step graph never gets the memory of the condition it reads.
        pool = torch.cuda.graph_pool_handle()
        self.encode_graph, self.step_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.encode_graph, pool=pool):
            self.condition = encode()
        with torch.cuda.graph(self.step_graph, pool=pool):
            step()

    def run(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
            flow_steps: int) -> torch.Tensor:
        self.observations.copy_(observations)
        self.goals.copy_(goals)
        self.w.copy_(w)
        self.actions.copy_(noise)
        self.step_index.zero_()
        self.dt.fill_(1.0 / flow_steps)
        self.encode_graph.replay()
        for _ in range(flow_steps):
            self.step_graph.replay()
        return self.actions.clamp(-1.0, 1.0)  # a fresh tensor: the next call overwrites the buffers


class OnnxRuntimeEngine:
    """onnxruntime sessions over the ONNX export, one per flow_steps (each export unrolls its steps)."""

    name = "onnxruntime"
    any_flow_steps = False

    def __init__(self, checkpoint: Checkpoint, artifacts_dir: Path, device: str | torch.device = "cpu",
                 threads: int = 1):
        ort = _import_onnxruntime()
        self.device = torch.device(device)
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            self._providers = ["CUDAExecutionProvider"]
        elif self.device.type == "cpu":
            self._providers = ["CPUExecutionProvider"]
        else:
            raise EngineUnavailable(f"onnxruntime has no provider for {self.device} "
                                    f"(available: {ort.get_available_providers()})")
        self.checkpoint, self.artifacts_dir, self.threads = checkpoint, Path(artifacts_dir), threads
        self.config = checkpoint.config
        self._sessions: dict[int, object] = {}
        self._goal_dtype = np.uint8 if self.config.goal_mode == "image" else np.float32

    def infer(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
              flow_steps: int) -> torch.Tensor:
        check_sampler_inputs(observations, goals, w, noise, flow_steps, self.config)
        feeds = {"observations": _numpy(observations, np.uint8), "goals": _numpy(goals, self._goal_dtype),
                 "w": _numpy(w, np.float32), "noise": _numpy(noise, np.float32)}
        (actions,) = self._session(flow_steps).run(None, feeds)
        return torch.from_numpy(actions).to(self.device)

    def _session(self, flow_steps: int):
        if flow_steps not in self._sessions:
            ort = _import_onnxruntime()
            path = onnx_artifact(self.checkpoint, flow_steps, self.artifacts_dir)
            options = ort.SessionOptions()
            # One intra-op thread: at batch 1 the ops are too small to split, and on a shared CPU
            # a spinning thread pool costs more than it gives.
            options.intra_op_num_threads = self.threads
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[flow_steps] = ort.InferenceSession(str(path), options, providers=self._providers)
        return self._sessions[flow_steps]


class TensorRTEngine:
    """A torch-tensorrt fp16 program of the whole sampler at a fixed flow_steps, dynamic batch."""

    name = "tensorrt"
    any_flow_steps = False

    def __init__(self, program_path: Path, config: PolicyConfig, flow_steps: int, device: torch.device,
                 max_batch: int):
        torch_tensorrt, _ = _import_tensorrt()
        self.device, self.config, self.flow_steps, self.max_batch = device, config, flow_steps, max_batch
        # torch_tensorrt.load registers the TensorRT engine op the saved program calls.
        self._module = torch_tensorrt.load(str(program_path)).module()

    @torch.inference_mode()
    def infer(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
              flow_steps: int) -> torch.Tensor:
        check_sampler_inputs(observations, goals, w, noise, flow_steps, self.config)
        if flow_steps != self.flow_steps:
            raise ValueError(f"this TensorRT program was built for flow_steps={self.flow_steps}, got {flow_steps}; "
                             f"export one with `cfgrl-export --flow-steps {flow_steps}`")
        if observations.shape[0] > self.max_batch:
            raise ValueError(f"this TensorRT program takes batches of at most {self.max_batch}, got "
                             f"{observations.shape[0]}; export one with `cfgrl-export --max-batch N`")
        return self._module(*_tensorrt_inputs(self.config, observations, goals, w, noise, self.device))


# --- Exportable form of the sampler and its artifacts ---------------------------------------------

class FixedStepsSampler(nn.Module):
    """The whole guided sampler with flow_steps unrolled: (observations, goals, w, noise) -> actions.

    w and the noise stay inputs (never baked in); the step times are constants of the artifact.
    Image inputs may be uint8 or already float (0..255); actions come out float32.
    """

    def __init__(self, sampler: GuidedSampler, flow_steps: int):
        super().__init__()
        if flow_steps < 1:
            raise ValueError(f"flow_steps must be >= 1, got {flow_steps}")
        self.sampler, self.flow_steps = sampler, flow_steps

    def forward(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        return self.sampler.integrate(observations, goals, w, noise, self.flow_steps).float()


def artifact_path(artifacts_dir: str | Path, kind: str, flow_steps: int) -> Path:
    """Where each artifact lives: sampler_k16.pt2, sampler_k16.onnx, sampler_k16_tensorrt_fp16.ep."""
    names = {"pt2": "sampler_k{}.pt2", "onnx": "sampler_k{}.onnx", "tensorrt": "sampler_k{}_tensorrt_fp16.ep"}
    return Path(artifacts_dir) / names[kind].format(flow_steps)


def default_artifacts_dir(checkpoint_path: str | Path) -> Path:
    return Path(checkpoint_path).with_suffix(".export")


def read_sidecar(path: Path) -> dict | None:
    sidecar = path.with_name(path.name + ".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None


def write_sidecar(path: Path, metadata: dict) -> None:
    path.with_name(path.name + ".json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


@functools.cache
def sampler_code_sha256() -> str:
    """SHA-256 of the source that an exported sampler bakes in (the policy, the sampler and this module's
    exportable wrapper): an artifact exported by other code is stale even for the same weights."""
    from cfgrl_ros import policy, sampler

    digest = hashlib.sha256()
    for source in (inspect.getsource(policy), inspect.getsource(sampler), inspect.getsource(FixedStepsSampler)):
        digest.update(source.encode())
    return digest.hexdigest()


def artifact_metadata(checkpoint: Checkpoint, flow_steps: int, kind: str, max_batch: int) -> dict:
    return {"kind": kind, "model_sha256": checkpoint.metadata.get("sha256", ""), "flow_steps": flow_steps,
            "goal_mode": checkpoint.config.goal_mode, "inputs": list(INPUT_NAMES), "outputs": ["actions"],
            "batch": [1, max_batch], "torch": torch.__version__, "sampler_code_sha256": sampler_code_sha256()}


def export_program(sampler: GuidedSampler, flow_steps: int, max_batch: int = 4096,
                   device: str | torch.device = "cpu",
                   image_dtype: torch.dtype = torch.uint8) -> torch.export.ExportedProgram:
    """torch.export the unrolled sampler with a dynamic batch dimension (1..max_batch)."""
    config = sampler.policy.config
    module = FixedStepsSampler(sampler.eval(), flow_steps)
    # Batch 2, not 1: torch.export specializes size-1 dimensions.
    inputs = example_inputs(config, batch_size=2, device=device)
    inputs = _with_image_dtype(config, inputs, image_dtype)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(module, inputs, dynamic_shapes=tuple({0: batch} for _ in INPUT_NAMES))


def export_onnx(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """ONNX (dynamo exporter, graph-optimized) of an exported sampler program."""
    # The exporter's own chatter (progress lines, "torchvision is not installed", a pytree deprecation)
    # says nothing about this export: the sampler uses no torchvision op. Real failures still raise.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            onnx_program = torch.onnx.export(program, dynamo=True, input_names=list(INPUT_NAMES),
                                             output_names=["actions"], optimize=True, verbose=False)
    except ImportError as error:  # onnxscript is what the dynamo exporter translates with
        raise EngineUnavailable(f"ONNX export needs onnxscript: {error}") from error
    finally:
        registration_log.setLevel(level)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per process and thread: a concurrent reader never sees half a file, nor two writers one temp file.
    partial = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    onnx_program.save(str(partial), external_data=False)
    os.replace(partial, path)
    return path


def onnx_artifact(checkpoint: Checkpoint, flow_steps: int, artifacts_dir: str | Path) -> Path:
    """The checkpoint's ONNX export for flow_steps, exported now if it is missing or stale."""
    path = artifact_path(artifacts_dir, "onnx", flow_steps)
    with EXPORT_LOCK:  # looked at again under the lock: a thread that waited may find it written
        found = read_sidecar(path)
        current = (found and found.get("model_sha256") == checkpoint.metadata.get("sha256")
                   and found.get("sampler_code_sha256") == sampler_code_sha256())
        if current and found.get("flow_steps") == flow_steps:
            return path
        log.info("onnxruntime: %s ONNX export at %s (flow_steps=%d); this takes a while",
                 "refreshing stale" if found else "writing", path, flow_steps)
        start = time.perf_counter()
        sampler = GuidedSampler(copy.deepcopy(checkpoint.policy).cpu().float())
        try:
            export_onnx(export_program(sampler, flow_steps), path)
            write_sidecar(path, artifact_metadata(checkpoint, flow_steps, "onnx", max_batch=4096))
        except OSError as error:
            raise EngineUnavailable(f"cannot write the ONNX export to {path}: {error}") from error
        log.info("onnxruntime: ONNX export took %.1f s", time.perf_counter() - start)
    return path


# --- TensorRT: build, cache key, refusal on mismatch -----------------------------------------------

def tensorrt_cache_key(checkpoint: Checkpoint, flow_steps: int, max_batch: int, device: torch.device) -> dict:
    """Everything a TensorRT engine depends on; any difference but max_batch means it must not be used."""
    torch_tensorrt, tensorrt = _import_tensorrt()
    properties = torch.cuda.get_device_properties(device)
    config = checkpoint.config
    goal_shape = [config.image_size, config.image_size, 3] if config.goal_mode == "image" else [config.goal_dim]
    return {
        "model_sha256": checkpoint.metadata.get("sha256", ""),
        "sampler_code_sha256": sampler_code_sha256(),
        "tensorrt": tensorrt.__version__,
        "torch_tensorrt": torch_tensorrt.__version__,
        "torch": torch.__version__,
        "gpu": properties.name,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "precision": "fp16",
        "flow_steps": flow_steps,
        "shapes": {"observation": [config.image_size, config.image_size, 3], "goal": goal_shape,
                   "action": [config.action_dim]},
        "max_batch": max_batch,  # the batch range 1..max_batch: any range serves, infer refuses a larger batch
    }


def check_cache_key(expected: dict, found: dict | None, path: Path) -> None:
    """Refuse a stale or foreign TensorRT program, naming every field that differs."""
    if found is None:
        raise EngineUnavailable(f"{path} has no readable cache key ({path.name}.json)")
    differences = [f"{k}: built for {found.get(k)!r}, here {v!r}" for k, v in expected.items()
                   if k != "max_batch" and found.get(k) != v]
    if differences:
        raise EngineUnavailable(f"TensorRT program {path} does not match this model/machine ("
                                + "; ".join(differences) + "); rebuild it with `cfgrl-export --formats tensorrt` "
                                "or delete it")


def build_tensorrt(checkpoint: Checkpoint, flow_steps: int, path: str | Path, device: str | torch.device = "cuda",
                   max_batch: int = 1024) -> Path:
    """Compile the exported sampler with torch-tensorrt in fp16 and save it with its cache key."""
    torch_tensorrt, _ = _import_tensorrt()
    device = _cuda_device(device, "tensorrt")
    key = tensorrt_cache_key(checkpoint, flow_steps, max_batch, device)
    # fp16 weights and activations, explicit in the graph; images enter as fp16 (0..255 is exact).
    sampler = GuidedSampler(copy.deepcopy(checkpoint.policy).to(device).half().eval())
    with EXPORT_LOCK:
        program = export_program(sampler, flow_steps, max_batch, device, image_dtype=torch.float16)
    example = _with_image_dtype(checkpoint.config, example_inputs(checkpoint.config, 1, device), torch.float16)
    trt_inputs = [torch_tensorrt.Input(min_shape=(1, *x.shape[1:]), opt_shape=(1, *x.shape[1:]),
                                       max_shape=(max_batch, *x.shape[1:]), dtype=x.dtype) for x in example]
    options = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    # The graph is fp16 already. torch-tensorrt 2.x before its 2026 API clean-up needs to be told to
    # respect that (use_explicit_typing) or, older still, allowed fp16 kernels; newer always does.
    if "use_explicit_typing" in options:
        precision = {"use_explicit_typing": True}
    elif "enabled_precisions" in options:
        precision = {"enabled_precisions": {torch.float16}}
    else:
        precision = {}
    log.warning("tensorrt: building an fp16 engine for %s (flow_steps=%d, batch 1..%d) on %s; this takes minutes",
                checkpoint.metadata.get("sha256", "?")[:12], flow_steps, max_batch, key["gpu"])
    start = time.perf_counter()
    with EXPORT_LOCK, torch.no_grad():
        module = torch_tensorrt.dynamo.compile(program, arg_inputs=trt_inputs, device=device, min_block_size=1,
                                               **precision)
    log.warning("tensorrt: build took %.1f s", time.perf_counter() - start)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, under a name that keeps the suffix (loaders may look at it), kept once verified.
    partial = path.with_name(f".tmp{os.getpid()}-{threading.get_ident()}.{path.name}")
    # Batch-2 examples and the batch dimension declared dynamic: saving re-exports the module, and an
    # export from batch-1 examples alone would specialise the program to batch 1.
    example = _with_image_dtype(checkpoint.config, example_inputs(checkpoint.config, 2, device), torch.float16)
    save_options = inspect.signature(torch_tensorrt.save).parameters
    dynamic = {}
    if "dynamic_shapes" in save_options:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic = {"dynamic_shapes": tuple({0: batch} for _ in INPUT_NAMES), "retrace": True}
    with EXPORT_LOCK:  # retrace=True exports the module again
        torch_tensorrt.save(module, str(partial), output_format="exported_program", arg_inputs=list(example),
                            **dynamic)
    try:
        verify_tensorrt(partial, checkpoint, flow_steps, device, max_batch)
    except Exception:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    write_sidecar(path, key)
    return path


TENSORRT_TOLERANCE = 5e-2  # fp16 weights and activations against the fp32 sampler, actions in [-1, 1]


def verify_tensorrt(path: Path, checkpoint: Checkpoint, flow_steps: int, device: torch.device, max_batch: int) -> None:
    """Reload a saved TensorRT program and compare it with the fp32 torch sampler at batch 1 and at a
    larger batch: a program specialised to one batch size, or numerically off, is never kept."""
    engine = TensorRTEngine(path, checkpoint.config, flow_steps, device, max_batch)
    reference = GuidedSampler(copy.deepcopy(checkpoint.policy)).to(device).eval()
    for batch_size in sorted({1, min(3, max_batch)}):
        inputs = example_inputs(checkpoint.config, batch_size, seed=batch_size)
        inputs = (*inputs[:2], torch.linspace(0.0, 3.0, batch_size), inputs[3])  # w per sample
        try:
            actions = engine.infer(*inputs, flow_steps)
        except Exception as error:  # noqa: BLE001 - e.g. a shape guard of a program fixed to one batch
            raise EngineUnavailable(f"the TensorRT program fails at batch {batch_size}: {error}") from error
        with torch.inference_mode():
            expected = reference(*(x.to(device) for x in inputs), flow_steps)
        error = (actions.float() - expected).abs().max().item()
        if not error <= TENSORRT_TOLERANCE:
            raise EngineUnavailable(f"the TensorRT program's actions differ from torch's by {error:.3g} at batch "
                                    f"{batch_size} (tolerance {TENSORRT_TOLERANCE})")


def _tensorrt_inputs(config: PolicyConfig, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor,
                     noise: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    inputs = tuple(x.to(device) for x in (observations, goals, w, noise))
    observations, goals, w, noise = _with_image_dtype(config, inputs, torch.float16)
    goals = goals if config.goal_mode == "image" else goals.float()  # the program takes fp32 oracle goals
    return observations, goals, w.float(), noise.float()


def _import_tensorrt():
    try:
        import tensorrt
        import torch_tensorrt
    except ImportError as error:
        raise EngineUnavailable(f"{TENSORRT_MISSING} ({error})") from error
    return torch_tensorrt, tensorrt


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise EngineUnavailable(f"onnxruntime is not installed ({error})") from error
    return onnxruntime


def _cuda_device(device: str | torch.device, backend: str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineUnavailable(f"{backend} needs a CUDA device (asked for {device}, "
                                f"CUDA available: {torch.cuda.is_available()})")
    return device


def _with_image_dtype(config: PolicyConfig, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple:
    observations, goals, w, noise = inputs
    goals = goals.to(dtype) if config.goal_mode == "image" else goals
    return observations.to(dtype), goals, w, noise


def _numpy(x: torch.Tensor, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=dtype)


def inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


# --- Loading --------------------------------------------------------------------------------------

def example_inputs(config: PolicyConfig, batch_size: int = 1, device: str | torch.device = "cpu",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic inputs of the right shapes and dtypes, for warm-up, export and tests."""
    generator = torch.Generator().manual_seed(seed)
    size = config.image_size
    observations = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=generator)
    if config.goal_mode == "image":
        goals = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=generator)
    else:
        goals = torch.randn(batch_size, config.goal_dim, generator=generator)
    w = torch.full((batch_size,), 1.0)
    noise = torch.randn(batch_size, config.action_dim, generator=generator)
    return tuple(x.to(device) for x in (observations, goals, w, noise))


def warm_up(engine: Engine, flow_steps: int = 16, iterations: int = 3) -> float:
    """Run a few inferences so first-call costs (allocation, autotuning, capture) happen now; seconds taken."""
    start = time.perf_counter()
    inputs = example_inputs(engine.config, device=engine.device)
    for _ in range(iterations):
        engine.infer(*inputs, flow_steps)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - start


def load_engine(checkpoint: str | os.PathLike | Checkpoint, backend: str = "torch", device: str = "cpu", *,
                flow_steps: int = 16, artifacts_dir: str | Path | None = None, compile_mode: str | None = None,
                onnx_threads: int = 1, tensorrt_max_batch: int = 1024) -> Engine:
    """Load a checkpoint (a path, or one already loaded on the CPU) into the named engine and warm it up at
    flow_steps.

    Raises ValueError for an unknown backend, CheckpointError for a bad checkpoint and
    EngineUnavailable when the backend cannot run here (so a caller can fall back); a backend named
    explicitly that fails otherwise (an export error, out of memory) raises its own error. "auto" tries
    the fastest engines for the device in turn and logs which one it took and why. tensorrt_max_batch
    is the batch range of a TensorRT program built here; a program already built is used whatever its range.
    """
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join((*BACKENDS, 'auto'))}")
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint, device="cpu")
    artifacts_dir = Path(artifacts_dir) if artifacts_dir else default_artifacts_dir(checkpoint.path)
    options = dict(flow_steps=flow_steps, artifacts_dir=artifacts_dir, compile_mode=compile_mode,
                   onnx_threads=onnx_threads, tensorrt_max_batch=tensorrt_max_batch)
    if backend != "auto":
        return _build_engine(checkpoint, backend, torch.device(device), **options)
    order = AUTO_ORDER["cuda" if torch.device(device).type == "cuda" else "cpu"]
    for candidate in order:
        try:
            # auto uses a TensorRT program that cfgrl-export already built; it never starts a build.
            engine = _build_engine(checkpoint, candidate, torch.device(device), **options, allow_tensorrt_build=False)
        except EngineUnavailable as error:
            log.warning("auto: %s is unavailable: %s", candidate, error)
            continue
        except Exception as error:  # noqa: BLE001 - a faster engine that breaks (an export error, a failed
            # graph capture, out of memory) must not stop auto from trying the next; the last one raises
            if candidate == order[-1]:
                raise
            log.warning("auto: %s failed: %s: %s", candidate, type(error).__name__, error)
            continue
        log.info("auto: chose %s on %s: the first that runs here in the fastest-first order %s", candidate,
                 device, " > ".join(order))
        return engine
    raise EngineUnavailable(f"no engine can run on {device}")  # only on CUDA: torch always runs on the CPU


def _build_engine(checkpoint: Checkpoint, backend: str, device: torch.device, *, flow_steps: int,
                  artifacts_dir: Path, compile_mode: str | None, onnx_threads: int, tensorrt_max_batch: int,
                  allow_tensorrt_build: bool = True) -> Engine:
    sampler = lambda: GuidedSampler(copy.deepcopy(checkpoint.policy))  # noqa: E731  fresh copy per engine
    if device.type == "cuda":
        _cuda_device(device, backend)  # EngineUnavailable here, not an assertion deep inside torch
    if backend == "torch":
        engine = TorchEngine(sampler(), device)
    elif backend == "compiled":
        engine = CompiledEngine(sampler(), device, compile_mode)
    elif backend == "cuda_graph":
        engine = CudaGraphEngine(sampler(), device)
    elif backend == "onnxruntime":
        engine = OnnxRuntimeEngine(checkpoint, artifacts_dir, device, onnx_threads)
    else:
        engine = _load_tensorrt(checkpoint, flow_steps, artifacts_dir, device, tensorrt_max_batch, allow_tensorrt_build)
    try:
        seconds = warm_up(engine, flow_steps)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # e.g. no C++ compiler for inductor
        raise EngineUnavailable(f"torch.compile failed on {device}: {error}") from error
    log.info("%s engine ready on %s (warm-up %.2f s)", engine.name, device, seconds)
    return engine


def _load_tensorrt(checkpoint: Checkpoint, flow_steps: int, artifacts_dir: Path, device: torch.device,
                   max_batch: int, build_if_missing: bool) -> TensorRTEngine:
    _import_tensorrt()
    device = _cuda_device(device, "tensorrt")
    path = artifact_path(artifacts_dir, "tensorrt", flow_steps)
    expected = tensorrt_cache_key(checkpoint, flow_steps, max_batch, device)
    if not path.is_file() and not build_if_missing:
        raise EngineUnavailable(f"no TensorRT program at {path}; build it with "
                                f"`cfgrl-export <checkpoint> --formats tensorrt --flow-steps {flow_steps}`")
    found = read_sidecar(path)
    try:
        check_cache_key(expected, found, path)
    except EngineUnavailable as stale:
        if not build_if_missing:
            raise
        if path.is_file():  # e.g. the checkpoint was retrained in place, or another GPU
            log.warning("%s: building a new one", stale)
        build_tensorrt(checkpoint, flow_steps, path, device, max_batch)
        found = read_sidecar(path)
        check_cache_key(expected, found, path)
    return TensorRTEngine(path, checkpoint.config, flow_steps, device, int(found["max_batch"]))


def to_numpy(actions: torch.Tensor) -> np.ndarray:
    return actions.detach().float().cpu().numpy()
