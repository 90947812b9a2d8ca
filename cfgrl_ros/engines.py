"""Inference engines: one small interface over eager PyTorch and its compiled forms.

Every engine runs the whole guided sampler (encode once, `flow_steps` guided Euler steps, clip) and
takes the same runtime inputs: uint8 observations (B, H, W, 3), goals, w (B,) and noise
(B, action_dim), so the node and the evaluators never care which one they hold.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch

from cfgrl_ros.checkpoint import load_checkpoint
from cfgrl_ros.policy import PolicyConfig
from cfgrl_ros.sampler import GuidedSampler


class Engine(Protocol):
    name: str
    config: PolicyConfig
    device: torch.device

    def infer(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
              flow_steps: int) -> torch.Tensor:
        """Guided actions (B, action_dim) on the engine's device."""


class TorchEngine:
    """Eager PyTorch on any device: the reference every other engine is checked against."""

    name = "torch"

    def __init__(self, sampler: GuidedSampler, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.sampler = sampler.to(self.device).eval()
        self.config = sampler.policy.config

    @torch.inference_mode()
    def infer(self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
              flow_steps: int) -> torch.Tensor:
        return self.sampler(observations.to(self.device), goals.to(self.device), w.to(self.device),
                            noise.to(self.device), flow_steps)


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


def load_engine(checkpoint_path: str, backend: str = "torch", device: str = "cpu") -> Engine:
    """Load a checkpoint into the named engine and warm it up."""
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; available: torch")
    checkpoint = load_checkpoint(checkpoint_path, device=device)
    engine = TorchEngine(GuidedSampler(checkpoint.policy), device)
    warm_up(engine)
    return engine


def to_numpy(actions: torch.Tensor) -> np.ndarray:
    return actions.detach().float().cpu().numpy()
