"""The CFGRL policy: an impala_small image encoder and a goal-conditioned flow-matching velocity MLP.

One network serves both guidance branches: the conditional branch sees the goal's representation,
the unconditional branch a learned null embedding in its place (the paper's shared-network
ablation, which extrapolates better than two networks). Training is plain supervised flow
matching with 10% of goals dropped to the null embedding; see `flow_matching_loss`.

Goal modes:
- "oracle": a low-dimensional goal vector (OGBench's `-oraclerep`, as in the paper). Its
  representation is the vector itself; the null embedding is a learned vector of the same size.
- "image": a 64x64 RGB goal image. It is encoded into a 512-d representation, by the observation
  encoder itself ("shared", the default) or by an encoder of its own ("separate"); the null
  embedding replaces that representation. Late fusion (encode, then concatenate) is what lets
  guidance drop the goal without feeding the encoder a fake image; OGBench's GCBC fuses early
  (6 stacked channels), which leaves no representation to replace.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

GoalMode = Literal["oracle", "image"]


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    action_dim: int
    goal_mode: GoalMode = "oracle"
    goal_dim: int = 3  # oracle goals only; ignored for image goals
    image_size: int = 64
    encoder_channels: tuple[int, ...] = (16, 32, 32)
    encoder_dim: int = 512
    hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    goal_encoder: Literal["shared", "separate"] = "shared"  # image goals only
    condition_dropout: float = 0.1

    def __post_init__(self) -> None:
        # A checkpoint's config is data: refuse what would build no model, here and by name.
        for name, least in (("action_dim", 1), ("image_size", 1), ("encoder_dim", 1), ("goal_dim", 0)):
            value = getattr(self, name)
            if not (_is_count(value) and value >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("encoder_channels", "hidden_dims"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and value and all(_is_count(v) and v >= 1 for v in value)):
                raise ValueError(f"{name} must be a non-empty tuple of integers >= 1, got {value!r}")
        if self.goal_mode not in ("oracle", "image"):
            raise ValueError(f"goal_mode must be 'oracle' or 'image', got {self.goal_mode!r}")
        if self.goal_mode == "oracle" and self.goal_dim < 1:
            raise ValueError(f"oracle goals need goal_dim >= 1, got {self.goal_dim}")
        if self.goal_encoder not in ("shared", "separate"):
            raise ValueError(f"goal_encoder must be 'shared' or 'separate', got {self.goal_encoder!r}")
        if self.image_size % 2 ** len(self.encoder_channels):
            raise ValueError(f"image_size {self.image_size} must divide by 2**{len(self.encoder_channels)}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must lie in [0, 1), got {self.condition_dropout}")

    @property
    def goal_repr_dim(self) -> int:
        return self.encoder_dim if self.goal_mode == "image" else self.goal_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PolicyConfig":
        if not isinstance(values, dict):
            raise TypeError(f"a PolicyConfig is a mapping of its fields, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown PolicyConfig fields: {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ImpalaSmallEncoder(nn.Module):
    """uint8 images (B, H, W, 3) -> (B, encoder_dim) features, as OGBench's impala_small."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 32), image_size: int = 64, out_dim: int = 512):
        super().__init__()
        stages, in_channels = [], 3
        for out_channels in channels:
            stages += [conv3x3(in_channels, out_channels), SameMaxPool(), ResidualBlock(out_channels)]
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        side = image_size // 2 ** len(channels)
        self.project = nn.Linear(side * side * in_channels, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(self.project.weight.dtype) / 255.0
        x = F.relu(self.stages(x))
        return F.gelu(self.project(x.flatten(1)), approximate="tanh")


class SameMaxPool(nn.Module):
    """3x3 max-pool, stride 2, with JAX's "SAME" padding.

    SAME pads (out-1)*2 + 3 - size in total, the extra one on the high side: for the encoder's even
    sizes that is one -inf row/column at the bottom/right only, unlike PyTorch's symmetric padding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel_size=3, stride=2)


class VelocityMLP(nn.Module):
    """v(obs_repr, goal_repr, x_t, t) with t one raw scalar; 4x512 GELU(tanh) layers.

    The first layer is split by input so that a sampler can compute the observation-and-goal part
    once per action and only the (x_t, t) part at each flow step; the sum is the same layer.
    """

    def __init__(self, condition_dim: int, action_dim: int, hidden_dims: tuple[int, ...]):
        super().__init__()
        self.condition_in = nn.Linear(condition_dim, hidden_dims[0])
        self.action_in = nn.Linear(action_dim + 1, hidden_dims[0], bias=False)
        dims = list(hidden_dims) + [action_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def condition(self, obs_repr: torch.Tensor, goal_repr: torch.Tensor) -> torch.Tensor:
        """First-layer pre-activation contribution of (obs, goal), reused across flow steps."""
        return self.condition_in(torch.cat([obs_repr, goal_repr], dim=-1))

    def forward(self, condition: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.gelu(condition + self.action_in(torch.cat([x_t, t], dim=-1)), approximate="tanh")
        for layer in self.layers[:-1]:
            h = F.gelu(layer(h), approximate="tanh")
        return self.layers[-1](h)


class CFGRLPolicy(nn.Module):
    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.encoder = ImpalaSmallEncoder(config.encoder_channels, config.image_size, config.encoder_dim)
        separate = config.goal_mode == "image" and config.goal_encoder == "separate"
        self.goal_encoder = (
            ImpalaSmallEncoder(config.encoder_channels, config.image_size, config.encoder_dim) if separate else None
        )
        self.null_goal = nn.Parameter(torch.zeros(config.goal_repr_dim))
        self.velocity = VelocityMLP(config.encoder_dim + config.goal_repr_dim, config.action_dim, config.hidden_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases everywhere, as the reference implementation."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # The condition and action halves of the first layer are one Dense layer in the reference:
        # initialise them as one matrix so the fan-in matches.
        first = torch.empty(self.velocity.condition_in.out_features,
                            self.velocity.condition_in.in_features + self.velocity.action_in.in_features)
        nn.init.xavier_uniform_(first)
        with torch.no_grad():
            self.velocity.condition_in.weight.copy_(first[:, : self.velocity.condition_in.in_features])
            self.velocity.action_in.weight.copy_(first[:, self.velocity.condition_in.in_features:])
        # As the reference's flax nn.Embed: std 1/sqrt(dim). A near-zero init would sit on a real goal
        # (zero is a cube at the table's centre in oracle coordinates) and blunt guidance early on.
        nn.init.normal_(self.null_goal, std=self.null_goal.numel() ** -0.5)

    def encode_observation(self, observations: torch.Tensor) -> torch.Tensor:
        return self.encoder(observations)

    def encode_goal(self, goals: torch.Tensor) -> torch.Tensor:
        if self.config.goal_mode == "oracle":
            return goals.to(self.null_goal.dtype)
        return (self.goal_encoder or self.encoder)(goals)

    def null_goals(self, batch_size: int) -> torch.Tensor:
        return self.null_goal.expand(batch_size, -1)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Training forward pass: the flow-matching loss (what DDP and torch.compile wrap)."""
        return self.flow_matching_loss(batch, generator)

    def flow_matching_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Conditional flow matching with per-sample goal dropout to the null embedding."""
        actions = batch["actions"]
        batch_size = actions.shape[0]
        obs_repr = self.encode_observation(batch["observations"])
        goal_repr = self.encode_goal(batch["goals"])
        drop = torch.rand(batch_size, 1, device=actions.device, generator=generator) < self.config.condition_dropout
        goal_repr = torch.where(drop, self.null_goals(batch_size).to(goal_repr.dtype), goal_repr)

        noise = torch.randn(actions.shape, device=actions.device, generator=generator, dtype=actions.dtype)
        t = torch.rand(batch_size, 1, device=actions.device, generator=generator, dtype=actions.dtype)
        x_t = (1 - t) * noise + t * actions
        predicted = self.velocity(self.velocity.condition(obs_repr, goal_repr), x_t, t)
        return F.mse_loss(predicted.float(), (actions - noise).float())
