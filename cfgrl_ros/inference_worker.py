"""ROS-free plumbing for the policy node: a one-slot mailbox, the inference thread, and live statistics.

The camera callback only drops the newest frame into a `Mailbox` and kicks the `InferenceWorker`;
inference runs on the worker's own thread, so a slow policy never blocks message handling and never
builds a queue: a frame replaced before anyone used it is counted as dropped.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Callable, Generic, TypeVar

import numpy as np

T = TypeVar("T")


class Mailbox(Generic[T]):
    """Holds only the newest item. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: T | None = None
        self._unread = False
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Store item; True when it replaced one that was never taken (which counts as dropped)."""
        with self._lock:
            replaced = self._unread
            self.dropped += replaced
            self._item, self._unread = item, True
            return replaced

    def take(self) -> T | None:
        """The newest item if it has not been taken yet, else None."""
        with self._lock:
            if not self._unread:
                return None
            self._unread = False
            return self._item

    def clear(self) -> None:
        with self._lock:
            self._item, self._unread = None, False


class InferenceWorker:
    """Runs `step()` on a thread of its own each time it is kicked.

    `step()` returns True when it did the rate-limited work (an inference); such steps start at least
    `min_interval_s` apart, while steps that found nothing to do cost no wait. Kicks that arrive while
    a step runs collapse into one follow-up step (never a queue). An exception
    in a step goes to `on_error` and the thread carries on: one bad input must not stop the robot's
    policy for good.
    """

    def __init__(self, step: Callable[[], bool], on_error: Callable[[BaseException], None],
                 min_interval_s: float = 0.0, name: str = "cfgrl-inference"):
        self._step, self._on_error = step, on_error
        self.min_interval_s = min_interval_s
        self._wake = threading.Condition()
        self._kicked = False
        self._running = False
        self._last_work = -math.inf  # start time of the last step that did work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def kick(self) -> None:
        with self._wake:
            self._kicked = True
            self._wake.notify()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Ask the thread to finish its current step and exit; waits up to timeout_s for it.

        True when the thread has ended. False when a step is still running past the timeout: the caller
        must then make sure that step's results go nowhere (the policy node gates its publisher).
        """
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is threading.current_thread():
            return False
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def on_own_thread(self) -> bool:
        """True when called from this worker's thread (from within a step)."""
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._kicked:
                    self._wake.wait()
                if not self._running:
                    return
                self._kicked = False
                # Rate cap: wait out the rest of the interval (a stop ends the wait), then work on
                # whatever is newest by then.
                delay = self._last_work + self.min_interval_s - time.monotonic()
                if delay > 0 and self._wake.wait_for(lambda: not self._running, timeout=delay):
                    return
            start = time.monotonic()
            try:
                if self._step():
                    self._last_work = start
            except Exception as error:  # noqa: BLE001 - reported, and the loop must survive
                self._on_error(error)


class RateMeter:
    """Events per second over a sliding window of wall time."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self.count = 0

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self.count += 1
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            # Events in the window over the window's length (or the time since the first event).
            span = min(self.window_s, now - self._times[0])
            return (len(self._times) - 1) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


class LatencyStats:
    """Percentiles of the most recent samples (milliseconds)."""

    def __init__(self, capacity: int = 1000):
        self._samples: collections.deque[float] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, value_ms: float) -> None:
        with self._lock:
            self._samples.append(value_ms)

    def percentiles(self, *qs: float) -> tuple[float, ...]:
        """NaN for each q while there are no samples."""
        with self._lock:
            samples = np.array(self._samples, dtype=np.float64)
        if samples.size == 0:
            return tuple(math.nan for _ in qs)
        return tuple(float(v) for v in np.percentile(samples, qs))

    def __len__(self) -> int:
        return len(self._samples)


OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels


class PolicyStats:
    """What the policy node counts and measures, and the one-line health summary it derives."""

    ERROR_HOLD_S = 10.0  # an inference error keeps the status at ERROR this long

    def __init__(self) -> None:
        self.camera_rate, self.goal_rate = RateMeter(), RateMeter()
        self.inference_rate, self.action_rate = RateMeter(), RateMeter()
        self.inference_ms, self.latency_ms = LatencyStats(), LatencyStats()
        self.rejected_images = self.rejected_goals = self.stale_actions = 0
        self.inference_errors = self.qos_incompatible = 0
        self.last_image_error = self.last_goal_error = self.last_inference_error = ""  # logs are throttled
        self._last_error_monotonic = -math.inf

    def record_error(self, error: BaseException) -> None:
        self.inference_errors += 1
        self.last_inference_error = f"{type(error).__name__}: {error}"
        self._last_error_monotonic = time.monotonic()

    def summary(self, active: bool, inputs: str, fresh: bool, enable_control: bool, fallback: str,
                qos_mismatch: str = "") -> tuple[int, str]:
        """(level, message), the most severe condition first. qos_mismatch: endpoints whose QoS is incompatible now."""
        if time.monotonic() - self._last_error_monotonic < self.ERROR_HOLD_S:
            return ERROR, f"inference failing: {self.last_inference_error}"
        if not active:
            return WARN, "inactive"
        if not fresh:
            return WARN, inputs
        if qos_mismatch:
            return WARN, f"incompatible QoS: {qos_mismatch} (see the log)"
        mode = "acting" if enable_control else "dry run (enable_control false)"
        if fallback:
            return WARN, f"{mode} on the torch fallback: {fallback}"
        return OK, f"{mode}, {self.action_rate.rate():.1f} actions/s"

    def values(self) -> dict[str, str]:
        p50, p99 = self.inference_ms.percentiles(50, 99)
        l50, l99 = self.latency_ms.percentiles(50, 99)
        return {
            "camera_rate_hz": f"{self.camera_rate.rate():.1f}",
            "goal_rate_hz": f"{self.goal_rate.rate():.1f}",
            "inferences": str(self.inference_rate.count),
            "inference_rate_hz": f"{self.inference_rate.rate():.1f}",
            "actions_published": str(self.action_rate.count),
            "action_rate_hz": f"{self.action_rate.rate():.1f}",
            "inference_ms_p50": f"{p50:.2f}",
            "inference_ms_p99": f"{p99:.2f}",
            "arrival_to_publish_ms_p50": f"{l50:.2f}",
            "arrival_to_publish_ms_p99": f"{l99:.2f}",
            "rejected_images": str(self.rejected_images),
            "last_image_error": self.last_image_error,
            "rejected_goals": str(self.rejected_goals),
            "last_goal_error": self.last_goal_error,
            "stale_actions": str(self.stale_actions),
            "inference_errors": str(self.inference_errors),
            "last_inference_error": self.last_inference_error,
            "qos_incompatible_events": str(self.qos_incompatible),
        }
