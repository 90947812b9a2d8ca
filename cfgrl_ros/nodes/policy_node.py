#!/usr/bin/env python3
"""The CFGRL policy node `cfgrl`: camera and goal in, guided actions out.

Subscribes (relative names, so namespaces and remaps work):
  camera/image  sensor_msgs/Image, best-effort keep-last-1 (overridable: qos_overrides.<topic>.subscription.*);
                camera/image/compressed (sensor_msgs/CompressedImage) instead with camera_transport compressed
  goal/image    sensor_msgs/Image, reliable transient-local   (image-goal policies)
  goal/vector   std_msgs/Float32MultiArray, same QoS          (oracle-goal policies)
Publishes:
  action        cfgrl_ros/PolicyAction, reliable keep-last-1; header.stamp = publish time,
                image_stamp = the source image's stamp. Stale actions carry the stale image's stamp
                and inference_time_ms = 0.
  /diagnostics  diagnostic_msgs/DiagnosticArray, ~1 Hz (wall clock, so it reports even without /clock)

A lifecycle node that configures (load + warm up the policy) and activates itself unless
autostart is false. The camera callback only stores the newest frame; an inference thread
(cfgrl_ros.inference_worker) computes actions from it, so frames are dropped, never queued.
The stale action (zeros by default: a stop) is published whenever the node cannot act on fresh
input: stale inputs; once acting, a rejected camera image or goal; a failed inference or a
non-finite action (never published); and once on deactivation (SIGINT/SIGTERM deactivate first).

Run: cfgrl_node --ros-args --params-file config/cfgrl.yaml -p policy:=/path/ckpt.safetensors
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time

import numpy as np
import rclpy
import torch
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.duration import Duration
from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks, qos_policy_name_from_kind
from rclpy.exceptions import ParameterException
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleState, Node as LifecycleNode, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSCompatibility, QoSProfile, ReliabilityPolicy,
                       qos_check_compatible)
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float32MultiArray

from cfgrl_ros.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from cfgrl_ros.control import ActionError, GoalError, Inputs, assess_inputs, checked_action, goal_vector, stale_action
from cfgrl_ros.engines import Engine, load_engine, to_numpy
from cfgrl_ros.image import ImageError, fit_to_policy, message_to_rgb
from cfgrl_ros.inference_worker import InferenceWorker, Mailbox, PolicyStats
from cfgrl_ros.msg import PolicyAction
from cfgrl_ros.node_params import PARAMETERS, SPECS, validate_changes

NODE_NAME = "cfgrl"
CAMERA_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
ACTION_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
# camera_transport -> (message type, topic): image_transport's names, so its republishers plug in.
CAMERA_INPUTS = {"raw": (Image, "camera/image"), "compressed": (CompressedImage, "camera/image/compressed")}
THROTTLE_S = 2.0
STALE_CHECK_PERIOD_S = 0.05
WORKER_STOP_TIMEOUT_S = 10.0  # deactivation waits this long for an inference in progress


@dataclasses.dataclass
class Frame:
    """A camera image as received; decoded on the inference thread, and only if it is still the newest."""
    message: Image
    arrival_s: float  # node clock
    arrival_monotonic: float  # wall clock, for the arrival-to-publish latency


@dataclasses.dataclass
class Observation:
    pixels: torch.Tensor  # (1, S, S, 3) uint8
    stamp: Time
    arrival_s: float
    arrival_monotonic: float


@dataclasses.dataclass(frozen=True)
class Active:
    """The engine in use and the flow_steps it is warmed up for: swapped together, read together."""
    engine: Engine
    flow_steps: int


@dataclasses.dataclass
class Goal:
    tensor: torch.Tensor  # (1, S, S, 3) uint8 or (1, goal_dim) float32, on the engine's device
    arrival_s: float


@dataclasses.dataclass(frozen=True)
class Inference:
    """One guided action and what produced it (the w and flow_steps in use when it ran)."""
    action: np.ndarray
    w: float
    flow_steps: int
    milliseconds: float


class PolicyNode(LifecycleNode):
    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._active: Active | None = None
        self._checkpoint: Checkpoint | None = None  # as loaded at configure: a flow_steps rebuild never rereads the file
        self._flow_steps_generation = 0  # the newest flow_steps request; older preparations are dropped
        self._engine_lock = threading.Lock()  # a prepared engine is installed, or the policy released, not both
        self.flow_steps_note = ""
        self.fallback_reason = ""
        self.frames: Mailbox[Frame] = Mailbox()
        # Only this activation's worker acts and publishes (and deactivation its final stop action): a step
        # still running after its stop() timed out never publishes, nor leaves an action to hold.
        self.worker: InferenceWorker | None = None  # replaced under _publish_lock
        self._publish_lock = threading.Lock()
        self._observation: Observation | None = None  # newest decoded frame; inference thread only
        self._frame_unacted = False  # _observation has not produced an action yet; inference thread only
        self._goal: Goal | None = None
        self._last_action: np.ndarray | None = None
        self._inputs = Inputs.NO_GOAL
        self._camera_arrival_s: float | None = None
        self._goal_arrival_s: float | None = None
        self._resize_logged: set[str] = set()  # "camera", "goal": each logged once
        self._subscriptions_active: list = []
        self._input_topics = ("camera/image", "goal")
        self._trigger = "timer"
        self._control_timer = None
        self._action_pub = self._diagnostics_pub = self._diagnostics_timer = None
        self.stats = PolicyStats()
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._after_parameters_set)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, ParameterDescriptor(
                # Dynamic typing everywhere: our validators check types and say what was wrong in words,
                # and `w 3` (an integer) is accepted where a double is meant.
                description=spec.full_description, read_only=spec.read_only, dynamic_typing=True))

    # ---------------------------------------------------------------- parameters
    @property
    def engine(self) -> Engine | None:
        active = self._active
        return active.engine if active else None

    def param(self, name: str):
        value = self.get_parameter(name).value
        return float(value) if SPECS[name].is_float else value

    def _check_parameters(self, parameters) -> SetParametersResult:
        current = {spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS if self.has_parameter(spec.name)}
        reason = validate_changes({p.name: p.value for p in parameters}, current)
        if reason is not None:
            self.get_logger().warning(f"parameter change refused: {reason}")
            return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _after_parameters_set(self, parameters) -> None:
        for parameter in parameters:
            if parameter.name == "flow_steps" and self._active:
                self._use_flow_steps(parameter.value)

    def _use_flow_steps(self, flow_steps: int) -> None:
        """Switch to flow_steps: at once where the engine takes any count, else once a new engine is ready.

        Some engines build per step count (onnxruntime exports one model per flow_steps, which takes
        tens of seconds on a CPU; a TensorRT program runs one count only): a new one is warmed up on a
        thread of its own while the node keeps acting, and stopping on stale input, with the engine it
        has; a separate engine object means no engine is ever called from two threads.
        """
        self._flow_steps_generation += 1  # whatever is still being prepared is superseded (a revert too)
        active = self._active
        if flow_steps == active.flow_steps:
            self.flow_steps_note = ""
            return
        if active.engine.any_flow_steps:
            self._active = Active(active.engine, flow_steps)
            self.flow_steps_note = ""
            self.get_logger().info(f"flow_steps {flow_steps} in use")
            return
        self.flow_steps_note = f"preparing flow_steps {flow_steps}"
        threading.Thread(target=self._load_for_flow_steps, args=(flow_steps, self._flow_steps_generation),
                         name="cfgrl-flow-steps", daemon=True).start()

    def _load_for_flow_steps(self, flow_steps: int, generation: int) -> None:
        current, checkpoint = self._active, self._checkpoint
        if current is None or checkpoint is None:
            return  # cleaned up before this thread ran
        start = time.perf_counter()
        try:
            engine = load_engine(checkpoint, current.engine.name, str(current.engine.device),
                                 flow_steps=flow_steps)
        except Exception as error:  # noqa: BLE001 - reported, and the count in use stays
            if generation == self._flow_steps_generation:
                note = f"flow_steps {flow_steps} failed on {current.engine.name}: {error}"
                self.get_logger().error(f"{note}; keeping flow_steps {current.flow_steps}")
                self.set_parameters([Parameter("flow_steps", value=current.flow_steps)])
                self.flow_steps_note = note  # after the revert, which clears the note
            return
        with self._engine_lock:
            superseded = generation != self._flow_steps_generation  # a newer request, or the node was cleaned up
            if not superseded:
                self._active = Active(engine, flow_steps)
        if superseded:
            self.get_logger().info(f"flow_steps {flow_steps} ready but superseded: dropped")
            return
        self.flow_steps_note = ""
        self.get_logger().info(f"flow_steps {flow_steps} in use ({engine.name} ready after "
                               f"{time.perf_counter() - start:.2f} s)")

    # ---------------------------------------------------------------- lifecycle
    def start(self, stop: threading.Event | None = None) -> bool:
        """Configure and activate (what autostart does); False when either step fails. A stop set while
        configuring (Ctrl-C during a minutes-long TensorRT build) leaves the node configured, not acting."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        if stop is not None and stop.is_set():
            self.get_logger().info("stop requested while configuring: not activating")
            return True
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._load_policy()
        except Exception as error:  # rclpy would turn it into ERROR without a word: say why
            self.get_logger().error(f"configure failed: {error}")
            self._active, self._checkpoint = None, None
            return TransitionCallbackReturn.FAILURE
        self._action_pub = self.create_lifecycle_publisher(
            PolicyAction, "action", ACTION_QOS,
            event_callbacks=PublisherEventCallbacks(incompatible_qos=self._on_offered_incompatible_qos))
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Wall clock: diagnostics keep coming under use_sim_time when /clock stops.
        self._diagnostics_timer = self.create_timer(1.0, self._publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))
        return TransitionCallbackReturn.SUCCESS

    def _load_policy(self) -> None:
        path, backend, device = self.param("policy"), self.param("backend"), self.param("device")
        if not path:
            raise CheckpointError("parameter 'policy' is empty: pass -p policy:=/path/to/checkpoint.safetensors")
        if self.param("cpu_threads") > 0:
            torch.set_num_threads(self.param("cpu_threads"))
        start = time.perf_counter()
        flow_steps = self.param("flow_steps")
        self._checkpoint = load_checkpoint(path)
        engine, self.fallback_reason = self._load_engine(self._checkpoint, backend, device, flow_steps)
        self._active = Active(engine, flow_steps)
        loaded_s = time.perf_counter() - start
        config = self.engine.config
        self.generator = torch.Generator().manual_seed(self.param("seed"))
        warm_ms = self._time_one_inference()
        self.get_logger().info(
            f"policy {path}: {config.goal_mode} goals, action_dim {config.action_dim}, engine {self.engine.name} "
            f"on {self.engine.device}; loaded and warmed up in {loaded_s:.2f} s, one more inference {warm_ms:.1f} ms")

    def _load_engine(self, checkpoint: Checkpoint, backend: str, device: str, flow_steps: int) -> tuple[Engine, str]:
        """The requested engine warmed up at flow_steps, or torch with the reason the requested one failed."""
        try:
            return load_engine(checkpoint, backend, device, flow_steps=flow_steps), ""
        except CheckpointError:
            raise  # a bad checkpoint fails every backend alike
        except Exception as error:  # noqa: BLE001 - any backend failure falls back to the reference engine
            if backend == "torch":
                raise
            reason = f"{backend} failed ({type(error).__name__}: {error})"
            self.get_logger().warning(f"{reason}; falling back to the torch engine")
            return load_engine(checkpoint, "torch", device, flow_steps=flow_steps), reason

    def _time_one_inference(self) -> float:
        """Milliseconds of one inference; an engine whose actions are not finite fails here, before acting."""
        config = self.engine.config
        size = config.image_size
        pixels = torch.zeros((1, size, size, 3), dtype=torch.uint8)
        goal = pixels if config.goal_mode == "image" else torch.zeros((1, config.goal_dim))
        inference = self._infer(pixels, goal.to(self.engine.device))
        checked_action(inference.action)
        return inference.milliseconds

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the action publisher before anything can publish
        try:
            self._start_acting()
        except Exception as error:  # rclpy would turn it into ERROR without a word (a bad qos_overrides value)
            self.get_logger().error(f"activate failed: {error}")
            self._stop_acting(publish_stop=False)
            super().on_deactivate(state)
            return TransitionCallbackReturn.FAILURE
        return result

    def _start_acting(self) -> None:
        self._trigger = trigger = self.param("trigger")
        rate = self.param("control_rate_hz")
        worker = InferenceWorker(self._control_step, self._on_worker_error,
                                 min_interval_s=1.0 / rate if trigger == "image" else 0.0)
        with self._publish_lock:
            self.worker = worker
        self.worker.start()
        self._subscribe()
        # timer trigger: every tick computes. image trigger: images kick the worker; the timer only
        # serves stale input its stale action, at most 20 Hz (a 1 kHz rate cap needs no 1 kHz timer).
        period = 1.0 / rate if trigger == "timer" else max(1.0 / rate, STALE_CHECK_PERIOD_S)
        self._control_timer = self.create_timer(period, self.worker.kick)
        camera, goal = self._subscriptions_active
        self.get_logger().info(f"active: trigger {trigger}, control rate {rate:g} Hz, w {self.param('w'):g}, "
                               f"flow_steps {self._active.flow_steps}; camera {camera.topic_name}, "
                               f"goal {goal.topic_name}, action {self._action_pub.topic_name}")

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_acting()
        return super().on_deactivate(state)  # lifecycle publishers drop messages from here on

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.worker is not None:
            self._stop_acting()
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error while in state {state.label}: releasing the policy")
        try:  # the inputs go too: a goal arriving after the release would find no engine
            self._stop_acting(publish_stop=False)
        finally:
            self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_acting(self, publish_stop: bool = True) -> None:
        """Stop inference and inputs, then publish the stale action once (zeros by default: a stop).

        What this activation saw and did is forgotten, so that a later activation never acts on, or holds,
        anything from before.
        """
        if self._control_timer is not None:
            self.destroy_timer(self._control_timer)
            self._control_timer = None
        with self._publish_lock:  # waits out a publish in progress; none follows
            worker, self.worker = self.worker, None
        if worker is not None and not worker.stop(timeout_s=WORKER_STOP_TIMEOUT_S):
            self.get_logger().error(f"the inference step did not finish within {WORKER_STOP_TIMEOUT_S:g} s; "
                                    "it is left to end on its own and can no longer publish")
        for subscription in self._subscriptions_active:
            self.destroy_subscription(subscription)
        self._subscriptions_active = []
        if publish_stop and self.engine is not None:
            self._publish_stale(final=True)
            # Reliable: make sure the stop reaches current subscribers before the publisher goes quiet.
            self._action_pub.wait_for_all_acked(Duration(seconds=0.5))
        self._observation, self._last_action, self._frame_unacted = None, None, False
        self._camera_arrival_s = None
        self.frames.clear()

    def _release(self) -> None:
        if self._diagnostics_timer is not None:
            self.destroy_timer(self._diagnostics_timer)
        if self._diagnostics_pub is not None:
            self.destroy_publisher(self._diagnostics_pub)
        if self._action_pub is not None:
            self.destroy_lifecycle_publisher(self._action_pub)
        self._action_pub = self._diagnostics_pub = self._diagnostics_timer = None
        with self._engine_lock:
            self._flow_steps_generation += 1  # a flow_steps preparation still running is dropped
            self._active, self._checkpoint = None, None
        self._goal, self._observation, self._last_action = None, None, None
        self._frame_unacted = False
        self._camera_arrival_s = self._goal_arrival_s = None
        self.frames.clear()

    # ---------------------------------------------------------------- inputs
    def _goal_topic(self) -> str:
        return "goal/image" if self.engine.config.goal_mode == "image" else "goal/vector"

    def _subscribe(self) -> None:
        def events(topic: str) -> SubscriptionEventCallbacks:
            resolved = self.resolve_topic_name(topic)
            return SubscriptionEventCallbacks(incompatible_qos=lambda info: self._on_requested_incompatible_qos(resolved, info))

        # Each kept as soon as it exists: a failure after the first (a bad QoS override) must not leak it.
        camera_type, camera_topic = CAMERA_INPUTS[self.param("camera_transport")]
        camera = self.create_subscription(
            camera_type, camera_topic, self._on_camera, CAMERA_QOS, event_callbacks=events(camera_topic),
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self._subscriptions_active.append(camera)
        goal_type, on_goal = ((Image, self._on_goal_image) if self.engine.config.goal_mode == "image"
                              else (Float32MultiArray, self._on_goal_vector))
        goal = self.create_subscription(goal_type, self._goal_topic(), on_goal, LATCHED_QOS,
                                        event_callbacks=events(self._goal_topic()))
        self._subscriptions_active.append(goal)
        self._input_topics = (camera.topic_name, goal.topic_name)  # resolved: namespace and remaps applied

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_camera(self, message: Image | CompressedImage) -> None:
        """Only stores the frame: decoding and inference happen on the inference thread."""
        self._camera_arrival_s = self._now_s()
        self.frames.put(Frame(message, self._camera_arrival_s, time.monotonic()))
        self.stats.camera_rate.tick()
        if self._trigger == "image" and self.worker is not None:
            self.worker.kick()

    def _on_goal_image(self, message: Image) -> None:
        try:
            pixels = self._decode(message, "goal")
        except ImageError as error:
            self._reject_goal(f"goal image rejected: {error}")
            return
        self._set_goal(torch.from_numpy(pixels)[None])

    def _on_goal_vector(self, message: Float32MultiArray) -> None:
        try:
            vector = goal_vector(np.frombuffer(message.data, dtype=np.float32), self.engine.config.goal_dim)
        except GoalError as error:
            self._reject_goal(f"goal rejected: {error}")
            return
        self._set_goal(torch.from_numpy(vector.copy())[None])

    def _set_goal(self, tensor: torch.Tensor) -> None:
        self._goal_arrival_s = self._now_s()
        self._goal = Goal(tensor.to(self.engine.device), self._goal_arrival_s)
        self.stats.goal_rate.tick()
        if self._trigger == "image" and self.worker is not None:
            self.worker.kick()  # a frame that came before its goal is acted on now, not at the next frame

    def _reject_goal(self, reason: str) -> None:
        # The previous goal is dropped too: after a bad goal the robot must not chase the old one.
        self._goal = None
        self.stats.rejected_goals += 1
        self.stats.last_goal_error = reason
        self.get_logger().error(f"{reason}; nothing computed until a valid goal arrives",
                                throttle_duration_sec=THROTTLE_S)

    def _decode(self, message: Image | CompressedImage, what: str) -> np.ndarray:
        rgb = message_to_rgb(message)
        size = self.engine.config.image_size
        if rgb.shape[:2] != (size, size) and what not in self._resize_logged:
            self._resize_logged.add(what)
            self.get_logger().info(f"{what} images are {rgb.shape[1]}x{rgb.shape[0]}: resizing to {size}x{size} "
                                   "with area interpolation (logged once)")
        return fit_to_policy(rgb, size)

    # ---------------------------------------------------------------- acting (inference thread)
    def _control_step(self) -> bool:
        """One control tick; True when it ran an inference (the image trigger's rate cap counts those)."""
        frame = self.frames.take()
        if frame is not None:
            self._frame_unacted = self._accept_frame(frame)
        goal, observation = self._goal, self._observation
        inputs = assess_inputs(self._now_s(), observation.arrival_s if observation else None,
                               goal.arrival_s if goal else None,
                               self.param("max_image_age_s"), self.param("max_goal_age_s"))
        self._note_inputs(inputs)
        # Once acting, losing an input (a rejected image or goal) stops like stale input does.
        if inputs.stale or (inputs.missing and self._last_action is not None):
            self._publish_stale()
            return False
        if inputs is not Inputs.FRESH or (self._trigger == "image" and not self._frame_unacted):
            return False
        inference = self._infer(observation.pixels, goal.tensor)
        if self._superseded():  # deactivated while inferring: this activation's state is gone
            return True
        try:
            action = checked_action(inference.action)
        except ActionError as error:  # never published: the stale action (a stop by default) instead
            self._on_worker_error(error)
            return True
        self._last_action = action
        if self.param("enable_control"):
            self._publish(action, observation.stamp, inference.w, inference.flow_steps, inference.milliseconds)
            if self._frame_unacted:  # first action from this frame: its arrival-to-publish latency
                self.stats.latency_ms.add((time.monotonic() - observation.arrival_monotonic) * 1e3)
        self._frame_unacted = False
        return True

    def _accept_frame(self, frame: Frame) -> bool:
        try:
            pixels = self._decode(frame.message, "camera")
        except ImageError as error:
            self._observation = None  # the camera's newest frame is unusable: act on nothing older
            self.stats.rejected_images += 1
            self.stats.last_image_error = str(error)
            self.get_logger().error(f"camera image rejected, nothing computed from it: {error}",
                                    throttle_duration_sec=THROTTLE_S)
            return False
        self._observation = Observation(torch.from_numpy(pixels)[None], frame.message.header.stamp,
                                        frame.arrival_s, frame.arrival_monotonic)
        return True

    def _note_inputs(self, inputs: Inputs) -> None:
        if inputs is not self._inputs:
            if inputs is Inputs.FRESH:
                self.get_logger().info("inputs fresh: acting")
            elif inputs.stale:
                self.get_logger().warning(f"{inputs.value}: stale_action '{self.param('stale_action')}'")
            self._inputs = inputs
        if inputs in (Inputs.NO_GOAL, Inputs.NO_IMAGE):
            topic = self._input_topics[inputs is Inputs.NO_GOAL]
            self.get_logger().warning(f"{inputs.value} on {topic}: no actions", throttle_duration_sec=THROTTLE_S)

    def _infer(self, pixels: torch.Tensor, goal: torch.Tensor) -> Inference:
        active, w = self._active, self.param("w")  # read once: the message reports what was used
        noise = torch.randn((1, active.engine.config.action_dim), generator=self.generator)
        start = time.perf_counter()
        action = to_numpy(active.engine.infer(pixels, goal, torch.full((1,), w), noise, active.flow_steps))[0]
        inference_ms = (time.perf_counter() - start) * 1e3
        self.stats.inference_ms.add(inference_ms)
        self.stats.inference_rate.tick()
        return Inference(action, w, active.flow_steps, inference_ms)

    def _publish_stale(self, final: bool = False) -> None:
        action = stale_action(self.param("stale_action"), self._last_action, self.engine.config.action_dim)
        if action is None or not self.param("enable_control"):
            return
        observation = self._observation
        if self._publish(action, observation.stamp if observation else Time(), self.param("w"),
                         self._active.flow_steps, 0.0, final):
            self.stats.stale_actions += 1

    def _publish(self, action: np.ndarray, image_stamp: Time, w: float, flow_steps: int,
                 inference_ms: float, final: bool = False) -> bool:
        """Publish one action, True when sent: only from the active worker's thread, or `final`
        (deactivation's stop action)."""
        message = PolicyAction()
        message.header.stamp = self.get_clock().now().to_msg()
        message.header.frame_id = self.param("frame_id")
        message.image_stamp = image_stamp
        message.action = action.astype(np.float32).tolist()
        message.w = w
        message.flow_steps = flow_steps
        message.inference_time_ms = inference_ms
        with self._publish_lock:
            if not final and self._superseded():
                return False
            self._action_pub.publish(message)
        self.stats.action_rate.tick()
        return True

    def _superseded(self) -> bool:
        """True on a worker thread that is not the active one (a step that outlived its deactivation)."""
        worker = self.worker
        return worker is None or not worker.on_own_thread()

    def _on_worker_error(self, error: BaseException) -> None:
        """A failed control step: reported, and the robot gets the stale action (a stop by default)."""
        self.stats.record_error(error)
        self.get_logger().error(f"inference failed: {type(error).__name__}: {error}; stale_action "
                                f"'{self.param('stale_action')}'", throttle_duration_sec=THROTTLE_S)
        try:
            if self._active is not None and self._action_pub is not None:
                self._publish_stale()
        except Exception as publish_error:  # noqa: BLE001 - the worker thread must survive its error handler
            self.get_logger().error(f"publishing the stale action failed too: {publish_error}",
                                    throttle_duration_sec=THROTTLE_S)

    # ---------------------------------------------------------------- diagnostics
    def _on_requested_incompatible_qos(self, topic: str, info) -> None:
        self.stats.qos_incompatible += info.total_count_change
        self.get_logger().warning(
            f"QoS incompatible with a publisher on {topic} ({qos_policy_name_from_kind(info.last_policy_kind)}): "
            "its messages will not arrive. Camera: best-effort keep-last-1 (override with "
            "qos_overrides.<topic>.subscription.*); goals: reliable transient-local.")

    def _on_offered_incompatible_qos(self, info) -> None:
        self.stats.qos_incompatible += info.total_count_change
        self.get_logger().warning(f"QoS incompatible with a subscriber on action "
                                  f"({qos_policy_name_from_kind(info.last_policy_kind)}): it gets no actions")

    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [self.diagnostic_status()]
        self._diagnostics_pub.publish(array)

    def _qos_mismatches(self) -> list[str]:
        """Endpoints on the node's topics right now whose QoS cannot match: the events only say one appeared.

        Both sides come from the ROS graph: a local profile's unset deadline and liveliness would read as
        incompatible with what discovery reports for the same settings.
        """
        def mine(info) -> bool:
            return (info.node_name, info.node_namespace) == (self.get_name(), self.get_namespace())

        topics = [(subscription.topic_name, False) for subscription in self._subscriptions_active]
        if self._action_pub is not None:
            topics.append((self._action_pub.topic_name, True))
        found = set()
        for topic, node_publishes in topics:
            publishers = self.get_publishers_info_by_topic(topic)
            subscribers = self.get_subscriptions_info_by_topic(topic)
            own, others = (publishers, subscribers) if node_publishes else (subscribers, publishers)
            for ours in filter(mine, own):
                for theirs in (info for info in others if not mine(info)):
                    offered, requested = (ours, theirs) if node_publishes else (theirs, ours)
                    if qos_check_compatible(offered.qos_profile, requested.qos_profile)[0] == QoSCompatibility.ERROR:
                        found.add(f"{'subscriber' if node_publishes else 'publisher'} {theirs.node_name} on {topic}")
        return sorted(found)

    def diagnostic_status(self) -> DiagnosticStatus:
        now, active, stats = self._now_s(), self._active, self.stats
        acting = self.worker is not None
        level, summary = stats.summary(acting, self._inputs.value, self._inputs is Inputs.FRESH,
                                       self.param("enable_control"), self.fallback_reason,
                                       ", ".join(self._qos_mismatches()))
        values = {
            "state": "active" if acting else "inactive",
            "inputs": self._inputs.value,
            "engine": active.engine.name if active else "",
            "backend_requested": self.param("backend"),
            "engine_fallback": self.fallback_reason,
            "device": str(active.engine.device) if active else self.param("device"),
            "w": f"{self.param('w'):g}",
            "flow_steps": str(active.flow_steps) if active else "",
            "flow_steps_note": self.flow_steps_note,
            "trigger": self._trigger if acting else self.param("trigger"),
            "enable_control": str(self.param("enable_control")).lower(),
            "camera_age_s": _age(now, self._camera_arrival_s),
            "goal_age_s": _age(now, self._goal_arrival_s),
            "dropped_frames": str(self.frames.dropped),
            **stats.values(),
        }
        return DiagnosticStatus(level=bytes([level]), name=f"{self.get_fully_qualified_name()}: policy",
                                message=summary, hardware_id=values["device"],
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])


def _age(now_s: float, then_s: float | None) -> str:
    return "never" if then_s is None else f"{max(0.0, now_s - then_s):.3f}"


def main(args: list[str] | None = None) -> int:
    # Our own signal handling: on SIGINT/SIGTERM the node must still be able to publish its stop action,
    # which rclpy's handlers prevent by shutting the context down first.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        node = PolicyNode()
    except ParameterException as error:  # a bad value in the params file
        rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    code = 0
    try:
        if node.param("autostart") and not node.start(stop):
            node.get_logger().fatal("autostart failed: see the error above")
            code = 1
        while code == 0 and rclpy.ok() and not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    finally:
        if node.worker is not None:
            node.trigger_deactivate()  # publishes the stale action as the last word
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
