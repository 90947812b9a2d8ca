"""Classifier-free-guided Euler sampling of a CFGRL policy.

    a ~ N(0, I);  for i in 0..K-1:  t = i/K,  v = v_null + w (v_goal - v_null),  a += v / K
    action = clip(a, -1, 1)        # only at the end

w = 0 samples the unconditional (flow BC) policy, w = 1 goal-conditioned BC, w > 1 CFGRL.
The observation and goal are encoded once per action; the conditional and null branches share one
batched pass per step (rows [:B] conditional, [B:] null). w, the noise and the number of steps are
runtime inputs, so nothing needs recompiling when they change: `euler_step` takes t, dt and w as
tensors, which lets an engine capture one step and replay it any number of times.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig


class GuidedSampler(nn.Module):
    def __init__(self, policy: CFGRLPolicy):
        super().__init__()
        self.policy = policy

    @property
    def config(self) -> PolicyConfig:
        return self.policy.config

    def encode(self, observations: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        """(B, ...) inputs -> (2B, hidden) first-layer conditions: conditional rows, then null rows."""
        policy = self.policy
        batch_size = observations.shape[0]
        obs_repr = policy.encode_observation(observations)
        goal_repr = policy.encode_goal(goals)
        both_goals = torch.cat([goal_repr, policy.null_goals(batch_size).to(goal_repr.dtype)])
        return policy.velocity.condition(torch.cat([obs_repr, obs_repr]), both_goals)

    def euler_step(
        self, condition: torch.Tensor, actions: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        """One guided Euler step. t and dt are 0-d tensors, w is (B,)."""
        batch_size = actions.shape[0]
        x = torch.cat([actions, actions])
        time = t.to(x.dtype).expand(2 * batch_size, 1)
        velocity = self.policy.velocity(condition, x, time)
        v_goal, v_null = velocity[:batch_size], velocity[batch_size:]
        return actions + dt * (v_null + w[:, None].to(v_null.dtype) * (v_goal - v_null))

    def forward(
        self,
        observations: torch.Tensor,
        goals: torch.Tensor,
        w: torch.Tensor,
        noise: torch.Tensor,
        flow_steps: int = 16,
    ) -> torch.Tensor:
        """Guided actions (B, action_dim) in [-1, 1] from uint8 observations, goals, w (B,) and noise."""
        check_sampler_inputs(observations, goals, w, noise, flow_steps, self.config)
        return self.integrate(observations, goals, w, noise, flow_steps)

    def integrate(
        self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, flow_steps: int
    ) -> torch.Tensor:
        """`forward` without the input checks, for tracing (torch.export, ONNX) with a dynamic batch."""
        condition = self.encode(observations, goals)
        actions = noise.to(condition.dtype)
        dt = torch.tensor(1.0 / flow_steps, device=noise.device)
        times = flow_times(flow_steps, noise.device)
        for i in range(flow_steps):
            actions = self.euler_step(condition, actions, times[i], dt, w)
        return actions.clamp(-1.0, 1.0)


def flow_times(flow_steps: int, device: torch.device | str) -> torch.Tensor:
    """t_i = i / K for the K Euler steps, made in one host-to-device copy (not one per step on a GPU)."""
    return torch.tensor([i / flow_steps for i in range(flow_steps)], device=device)


def check_sampler_inputs(
    observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, flow_steps: int,
    config: PolicyConfig,
) -> None:
    """Shape and dtype checks that turn a silent broadcast or rescaling into a clear error.

    Images must be uint8: float pixels in [0, 1] would run but give other actions (the encoder scales by 1/255).
    Values are not checked here (that would cost a device sync per call): the node refuses non-finite w
    and goals before they get here, and the node and the evaluators refuse non-finite actions after.
    """
    image_shape = (config.image_size, config.image_size, 3)
    if observations.dtype != torch.uint8 or observations.dim() != 4 or tuple(observations.shape[1:]) != image_shape:
        raise ValueError(f"observations must be (B, {config.image_size}, {config.image_size}, 3) uint8, "
                         f"got {observations.dtype} {tuple(observations.shape)}")
    batch_size = observations.shape[0]
    if config.goal_mode == "image":
        if goals.dtype != torch.uint8 or tuple(goals.shape) != (batch_size, *image_shape):
            raise ValueError(f"goal images must be ({batch_size}, {config.image_size}, {config.image_size}, 3) "
                             f"uint8, got {goals.dtype} {tuple(goals.shape)}")
    elif not goals.is_floating_point() or tuple(goals.shape) != (batch_size, config.goal_dim):
        raise ValueError(f"oracle goals must be float ({batch_size}, {config.goal_dim}), "
                         f"got {goals.dtype} {tuple(goals.shape)}")
    if w.shape != (batch_size,):
        raise ValueError(f"w must have shape ({batch_size},), got {tuple(w.shape)}")
    if noise.shape != (batch_size, config.action_dim) or not noise.is_floating_point():
        raise ValueError(f"noise must be float ({batch_size}, {config.action_dim}), "
                         f"got {noise.dtype} {tuple(noise.shape)}")
    if not isinstance(flow_steps, int) or isinstance(flow_steps, bool) or flow_steps < 1:
        raise ValueError(f"flow_steps must be a positive int, got {flow_steps!r}")
