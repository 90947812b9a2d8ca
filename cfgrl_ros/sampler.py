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

from cfgrl_ros.policy import CFGRLPolicy


class GuidedSampler(nn.Module):
    def __init__(self, policy: CFGRLPolicy):
        super().__init__()
        self.policy = policy

    @property
    def action_dim(self) -> int:
        return self.policy.config.action_dim

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
        check_sampler_inputs(observations, goals, w, noise, flow_steps, self.action_dim)
        return self.integrate(observations, goals, w, noise, flow_steps)

    def integrate(
        self, observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, flow_steps: int
    ) -> torch.Tensor:
        """`forward` without the input checks, for tracing (torch.export, ONNX) with a dynamic batch."""
        condition = self.encode(observations, goals)
        actions = noise.to(condition.dtype)
        dt = torch.tensor(1.0 / flow_steps, device=noise.device)
        for i in range(flow_steps):
            actions = self.euler_step(condition, actions, torch.tensor(i / flow_steps, device=noise.device), dt, w)
        return actions.clamp(-1.0, 1.0)


def check_sampler_inputs(
    observations: torch.Tensor, goals: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, flow_steps: int, action_dim: int
) -> None:
    """Shape checks that turn a silent broadcast into a clear error."""
    batch_size = observations.shape[0]
    if observations.dim() != 4 or observations.shape[-1] != 3:
        raise ValueError(f"observations must be (B, H, W, 3) uint8, got {tuple(observations.shape)}")
    if goals.shape[0] != batch_size:
        raise ValueError(f"goals batch {goals.shape[0]} != observations batch {batch_size}")
    if w.shape != (batch_size,):
        raise ValueError(f"w must have shape ({batch_size},), got {tuple(w.shape)}")
    if noise.shape != (batch_size, action_dim):
        raise ValueError(f"noise must have shape ({batch_size}, {action_dim}), got {tuple(noise.shape)}")
    if not isinstance(flow_steps, int) or flow_steps < 1:
        raise ValueError(f"flow_steps must be a positive int, got {flow_steps!r}")
