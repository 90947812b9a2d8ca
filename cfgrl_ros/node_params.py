"""Every parameter of the policy node in one table, with its validator; ROS-free.

The node turns each `ParamSpec` into a declared ROS parameter and calls `validate` from its
on-set-parameters callback, so a bad value (from the params file or `ros2 param set`) is refused
with a reason and changes nothing. config/cfgrl.yaml lists the same parameters with comments; a
test keeps the two in step.

Parameters are declared with dynamic typing: users type `ros2 param set /cfgrl w 3`, an integer,
which a plain double parameter refuses, and ROS's own type errors ("expected '2' got '3'") say
little. So the validators check types too: floats accept int or float (the node reads them through
float()), ints, strings and booleans only their own type.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping

BACKENDS = ("auto", "torch", "cuda_graph", "compiled", "onnxruntime", "tensorrt")
TRIGGERS = ("timer", "image")
CAMERA_TRANSPORTS = ("raw", "compressed")
STALE_ACTIONS = ("zero", "hold", "none")
MAX_FLOW_STEPS = 256

Validator = Callable[[Any, Mapping[str, Any]], "str | None"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    default: bool | int | float | str
    description: str
    validate: Validator
    # When a change takes effect: "start" = read-only, fixed for the node's lifetime (command line or
    # params file); "configure"/"activate" = read at that lifecycle transition; "live" = next action.
    applies: Literal["start", "configure", "activate", "live"]

    @property
    def read_only(self) -> bool:
        return self.applies == "start"

    @property
    def is_float(self) -> bool:
        return isinstance(self.default, float)

    @property
    def full_description(self) -> str:
        when = {"start": "Read-only.", "configure": "Read at configure.", "activate": "Read at activation.",
                "live": "Applies from the next action on."}[self.applies]
        return f"{self.description} {when}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def finite_in(low: float, high: float) -> Validator:
    def validate(value: Any, _: Mapping[str, Any]) -> str | None:
        number = _number(value)
        if number is None:
            return f"must be a number, got {type(value).__name__} {value!r}"
        if not math.isfinite(number) or not low <= number <= high:
            return f"must be finite and within [{low:g}, {high:g}], got {value!r}"
        return None
    return validate


def int_in(low: int, high: int) -> Validator:
    def validate(value: Any, _: Mapping[str, Any]) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {type(value).__name__} {value!r}"
        if not low <= value <= high:
            return f"must be within [{low}, {high}], got {value}"
        return None
    return validate


def one_of(choices: tuple[str, ...]) -> Validator:
    def validate(value: Any, _: Mapping[str, Any]) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}; got {value!r}"
    return validate


def boolean(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def any_string(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {value!r}"


def any_int(value: Any, _: Mapping[str, Any]) -> str | None:
    return int_in(-(2**63), 2**63 - 1)(value, {})


def device_name(value: Any, _: Mapping[str, Any]) -> str | None:
    import torch  # torch parses device strings exactly as the engine will

    if not isinstance(value, str):
        return f"must be a device name string, got {value!r}"
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as error:
        return f"is not a torch device ('cpu', 'cuda', 'cuda:1', ...): {error}"
    return None


def guidance_weight(value: Any, params: Mapping[str, Any]) -> str | None:
    return finite_in(float(params["w_min"]), float(params["w_max"]))(value, params)


def w_bound(value: Any, params: Mapping[str, Any]) -> str | None:
    return finite_in(-1e6, 1e6)(value, params)


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("policy", "", "Path of the policy checkpoint (.safetensors) to load at configure.", any_string, "start"),
    ParamSpec("backend", "auto", f"Inference engine: {', '.join(BACKENDS)}. If it fails to load, the node falls back "
              "to torch and reports why in /diagnostics.", one_of(BACKENDS), "start"),
    ParamSpec("device", "cpu", "Torch device for inference: cpu, cuda, cuda:N.", device_name, "start"),
    ParamSpec("cpu_threads", 1, "torch intra-op threads (0 = torch's default). One thread is fastest for this "
              "batch-1 policy and stays fast when other processes share the CPU.", int_in(0, 256), "start"),
    ParamSpec("autostart", True, "Configure and activate at start-up; false waits for a lifecycle manager.", boolean, "start"),
    ParamSpec("w_min", 0.0, "Lowest guidance weight accepted for w.", w_bound, "start"),
    ParamSpec("w_max", 20.0, "Highest guidance weight accepted for w.", w_bound, "start"),
    ParamSpec("w", 3.0, "Guidance weight: 0 = flow BC, 1 = goal-conditioned BC, >1 = CFGRL. Finite, within "
              "[w_min, w_max]; integers accepted.", guidance_weight, "live"),
    ParamSpec("flow_steps", 16, f"Euler steps per action, 1..{MAX_FLOW_STEPS}.", int_in(1, MAX_FLOW_STEPS), "live"),
    ParamSpec("trigger", "timer", "timer: act at control_rate_hz; image: act as soon as a new camera image arrives, "
              "at most control_rate_hz.", one_of(TRIGGERS), "activate"),
    ParamSpec("camera_transport", "raw", "raw: sensor_msgs/Image on camera/image; compressed: "
              "sensor_msgs/CompressedImage (JPEG/PNG, image_transport's compressed plugin) on camera/image/compressed, "
              "for a camera on another machine.", one_of(CAMERA_TRANSPORTS), "activate"),
    ParamSpec("control_rate_hz", 20.0, "Action rate (timer trigger) or its cap (image trigger); the training "
              "data's control rate (OGBench: 20 Hz), since each action is one step of it.",
              finite_in(0.1, 1000.0), "activate"),
    ParamSpec("max_image_age_s", 0.5, "A camera image older than this (by arrival, on the node clock) is stale.",
              finite_in(0.001, 3600.0), "live"),
    ParamSpec("max_goal_age_s", 0.0, "A goal older than this is stale; 0 = goals never go stale (they are latched).",
              finite_in(0.0, 1e9), "live"),
    ParamSpec("stale_action", "zero", "When there is no fresh action (stale input; once acting, a rejected image "
              "or goal; a failed inference) and once at deactivation: zero = publish zeros, hold = republish the "
              "last action, none = publish nothing.", one_of(STALE_ACTIONS), "live"),
    ParamSpec("enable_control", True, "false = dry run: compute and report in /diagnostics, publish no action.",
              boolean, "live"),
    ParamSpec("seed", 0, "Seed of the noise generator (seeded once at configure; each action draws fresh noise).",
              any_int, "configure"),
    ParamSpec("frame_id", "base_link", "frame_id written into each PolicyAction header.", any_string, "live"),
)

SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}


def validate_changes(changes: Mapping[str, Any], current: Mapping[str, Any],
                     specs: Mapping[str, ParamSpec] = SPECS) -> str | None:
    """Check a batch of changes against a table (the policy node's by default); the first reason found, or
    None when all are valid.

    Read-only parameters are refused by ROS itself after start-up; here they are validated like the
    rest, which is what catches a bad value in the params file at declaration.
    """
    merged = {**current, **changes}
    for name, value in changes.items():
        spec = specs.get(name)
        if spec is None:
            continue  # not ours (use_sim_time, qos_overrides.*): ROS validates those
        reason = spec.validate(value, merged)
        if reason is not None:
            return f"{name} {reason}"
    if "w_min" in changes or "w_max" in changes:
        if _number(merged.get("w_min")) is not None and _number(merged.get("w_max")) is not None \
                and float(merged["w_min"]) > float(merged["w_max"]):
            return f"w_min ({merged['w_min']}) must not exceed w_max ({merged['w_max']})"
    return None
