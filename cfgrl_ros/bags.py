"""rosbag2 recordings (mcap storage) without a ROS install, through the `rosbags` library.

A bag is a rosbag2 directory (metadata.yaml + one .mcap file, format version 9, with each topic's
offered QoS), as `ros2 bag record -s mcap` writes on Jazzy and later, and `read_bag` reads bags from
ROS 2 too; playing them with `ros2 bag play` is untested here (no ROS install). Messages go in as CDR bytes
(what an rclpy raw subscription delivers, byte-identical to rclpy's own serialization) and come out
as rosbags message objects with the ROS field names. cfgrl_ros/msg/PolicyAction is registered from
its .msg file so that bags holding actions read back without the generated message package.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from rosbags.interfaces import Qos
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer
from rosbags.rosbag2.storage_mcap import decompress
from rosbags.typesys import Stores, get_typestore, get_types_from_msg
from rosbags.typesys.store import Typestore

POLICY_ACTION_TYPE = "cfgrl_ros/msg/PolicyAction"
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)  # what a camera topic may hold (cfgrl_ros.image decodes both)
VECTOR_TYPE = "std_msgs/msg/Float32MultiArray"
STRING_TYPE = "std_msgs/msg/String"
JOY_TYPE = "sensor_msgs/msg/Joy"


class BagError(ValueError):
    """A bag that cannot be read or written: missing, not rosbag2, or holding unexpected types."""


@dataclasses.dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    timestamp_ns: int  # receive (record) time
    message: object  # a rosbags message object


def policy_action_msgdef() -> str:
    """The text of PolicyAction.msg, from the source tree or the installed share/cfgrl_ros/msg."""
    candidates = [Path(__file__).resolve().parents[1] / "msg" / "PolicyAction.msg",
                  Path(sys.prefix) / "share" / "cfgrl_ros" / "msg" / "PolicyAction.msg"]
    candidates += [Path(prefix) / "share" / "cfgrl_ros" / "msg" / "PolicyAction.msg"
                   for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if prefix]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text()
    raise BagError(f"PolicyAction.msg not found in {[str(c) for c in candidates]}")


@functools.cache
def typestore() -> Typestore:
    """ROS 2 Kilted's standard types plus cfgrl_ros/msg/PolicyAction."""
    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg(policy_action_msgdef(), POLICY_ACTION_TYPE))
    return store


class BagWriter:
    """Write CDR messages to a new rosbag2 mcap bag; one connection per topic, created on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"{self.path} exists; rosbag2 bags are never overwritten, choose a new path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._connections: dict[str, object] = {}
        self.counts: dict[str, int] = {}

    def write_cdr(self, topic: str, msgtype: str, timestamp_ns: int, data: bytes,
                  offered_qos: Qos | None = None) -> None:
        """offered_qos (taken on a topic's first message): what `ros2 bag play` publishes it with; without
        it rosbag2 plays reliable volatile, which a transient-local (latched goal) subscriber never takes."""
        connection = self._connections.get(topic)
        if connection is None:
            connection = self._writer.add_connection(topic, msgtype, typestore=typestore(),
                                                     offered_qos_profiles=[offered_qos] if offered_qos else ())
            self._connections[topic] = connection
        elif connection.msgtype != msgtype:
            raise BagError(f"{topic} is recorded as {connection.msgtype}, cannot add a {msgtype}")
        self._writer.write(connection, int(timestamp_ns), bytes(data))
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def write(self, topic: str, msgtype: str, timestamp_ns: int, message: object) -> None:
        """Write a rosbags message object (e.g. from `image_message`)."""
        self.write_cdr(topic, msgtype, timestamp_ns, typestore().serialize_cdr(message, msgtype))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def same_topic(name: str) -> str:
    """Topic names compared without the leading slash: 'camera/image' matches a bag's '/camera/image'."""
    return name.lstrip("/")


def read_bag(path: str | os.PathLike, types: Mapping[str, str] | None = None) -> Iterator[BagMessage]:
    """Messages in record-time order: of every topic, or of those in `types` (topic -> message type),
    where a topic recorded with another type is refused before anything is decoded.

    Every failure is a BagError: a truncated or damaged file, a type this store cannot decode, or a bag
    that yields fewer messages than its metadata lists (the mcap writer leaves chunk CRCs at 0, so a
    damaged chunk can otherwise go unnoticed).
    """
    path = Path(path)
    if not (path / "metadata.yaml").is_file():
        raise BagError(f"{path} is not a rosbag2 bag directory (no metadata.yaml)")
    store = typestore()
    wanted = None if types is None else {same_topic(topic): msgtype for topic, msgtype in types.items()}
    try:
        with Reader(path) as reader:
            connections = [c for c in reader.connections if wanted is None or same_topic(c.topic) in wanted]
            for connection in connections:
                expected = None if wanted is None else wanted[same_topic(connection.topic)]
                if expected is not None and connection.msgtype != expected:
                    raise BagError(f"{path}: {connection.topic} holds {connection.msgtype}, expected {expected}")
            listed = sum(c.msgcount for c in connections)
            read = 0
            for connection, timestamp, data in reader.messages(connections=connections):
                try:
                    message = store.deserialize_cdr(data, connection.msgtype)
                except Exception as error:  # noqa: BLE001 - rosbags raises KeyError, struct.error, ...
                    raise BagError(f"{path}: message {read} on {connection.topic} ({connection.msgtype}) cannot "
                                   f"be decoded ({type(error).__name__}: {error})") from error
                read += 1
                yield BagMessage(connection.topic, connection.msgtype, timestamp, message)
            if read != listed:
                raise BagError(f"{path}: read {read} messages of the {listed} its metadata lists: the bag is damaged")
    except BagError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged file fails anywhere in the parser (ReaderError,
        # OSError, UnicodeDecodeError, OverflowError, ... were all seen with a few flipped bytes)
        raise BagError(f"{path}: cannot read the bag ({type(error).__name__}: {error})") from error


def bag_topics(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """topic -> (msgtype, message count)."""
    if not (Path(path) / "metadata.yaml").is_file():
        raise BagError(f"{path} is not a rosbag2 bag directory (no metadata.yaml)")
    try:
        with Reader(Path(path)) as reader:
            return {topic: (info.msgtype, info.msgcount) for topic, info in reader.topics.items()}
    except Exception as error:  # noqa: BLE001 - as in read_bag: a damaged file fails anywhere in the parser
        raise BagError(f"{path}: cannot read the bag ({type(error).__name__}: {error})") from error


# --- recovery of a bag whose recorder was killed ----------------------------------------------------
# Such a bag has no metadata.yaml and its .mcap file ends without MCAP's summary and footer, so no reader
# opens it. Every chunk the writer finished (about 1 MiB of messages each) is still complete in the file:
# reading the records in file order up to the first one cut short recovers them.

_MCAP_MAGIC = b"\x89MCAP0\r\n"
_SCHEMA, _CHANNEL, _MESSAGE, _CHUNK = 0x03, 0x04, 0x05, 0x06


def _mcap_records(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(opcode, content) of each complete record in `data`; ends at a record cut short."""
    offset = 0
    while offset + 9 <= len(data):
        opcode, length = struct.unpack_from("<BQ", data, offset)
        end = offset + 9 + length
        if end > len(data):
            return
        yield opcode, data[offset + 9 : end]
        offset = end


def _mcap_string(record: memoryview, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<I", record, offset)
    return bytes(record[offset + 4 : offset + 4 + length]).decode(), offset + 4 + length


def _mcap_messages(data: memoryview) -> Iterator[tuple[str, str, int, bytes]]:
    """(topic, msgtype, log time, CDR bytes) of every message in complete records, in file order."""
    schemas: dict[int, str] = {}
    channels: dict[int, tuple[str, str]] = {}
    for opcode, record in _mcap_records(data):
        if opcode == _CHUNK:
            _start, _end, size, crc = struct.unpack_from("<QQQI", record)
            compression, offset = _mcap_string(record, 28)
            (length,) = struct.unpack_from("<Q", record, offset)
            inner = decompress(bytes(record[offset + 8 : offset + 8 + length]), compression, size, crc)
            records = _mcap_records(memoryview(inner))
        else:
            records = iter([(opcode, record)])
        for inner_opcode, inner_record in records:
            if inner_opcode == _SCHEMA:
                (schema_id,) = struct.unpack_from("<H", inner_record)
                schemas[schema_id], _ = _mcap_string(inner_record, 2)
            elif inner_opcode == _CHANNEL:
                channel_id, schema_id = struct.unpack_from("<HH", inner_record)
                topic, _ = _mcap_string(inner_record, 4)
                channels[channel_id] = (topic, schemas[schema_id])
            elif inner_opcode == _MESSAGE:
                channel_id, _sequence, log_time, _publish_time = struct.unpack_from("<HIQQ", inner_record)
                yield (*channels[channel_id], log_time, bytes(inner_record[22:]))


def recover_bag(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, int]:
    """Copy the messages of every complete chunk of a killed recorder's bag into a new bag `out`.

    The damaged bag is left as it is. Returns messages per topic; the last chunk the writer had not
    finished (up to about 1 MiB of the newest messages) is lost. Any failure is a BagError.
    """
    path, out = Path(path), Path(out)
    files = sorted(path.glob("*.mcap")) if path.is_dir() else []
    if len(files) != 1:
        raise BagError(f"{path}: expected a bag directory holding one .mcap file, found {[f.name for f in files]}")
    if out.exists():
        raise BagError(f"{out} exists; rosbag2 bags are never overwritten, choose a new path")
    try:
        with open(files[0], "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            if mapped[: len(_MCAP_MAGIC)] != _MCAP_MAGIC:
                raise BagError(f"{files[0]} is not an MCAP file")
            return _copy_messages(memoryview(mapped)[len(_MCAP_MAGIC) :], files[0], out)
    except BagError:
        raise
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, ReaderError, OSError) as error:
        raise BagError(f"{files[0]}: cannot recover the bag ({type(error).__name__}: {error})") from error


def _copy_messages(view: memoryview, source: Path, out: Path) -> dict[str, int]:
    """Write the messages in `view` to the new bag `out`, which is removed again if anything fails."""
    messages = _mcap_messages(view)
    writer = BagWriter(out)
    try:
        with writer:
            for topic, msgtype, timestamp, data in messages:
                if msgtype not in typestore().types:
                    raise BagError(f"{source}: {topic} holds {msgtype}, which this reader does not know")
                writer.write_cdr(topic, msgtype, timestamp, data)
        if not writer.counts:
            raise BagError(f"{source}: no complete chunk of messages to recover")
        return dict(writer.counts)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a partial copy that looks like a recovered bag
        raise
    finally:
        messages.close()  # drops the generator's slices of the mapping, so it can be closed
        view.release()


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def make_stamp(nanoseconds: int):
    return typestore().types["builtin_interfaces/msg/Time"](sec=nanoseconds // 1_000_000_000,
                                                            nanosec=nanoseconds % 1_000_000_000)


def image_message(pixels: np.ndarray, stamp_nanoseconds: int, frame_id: str = "camera"):
    """(H, W, 3) uint8 -> a rosbags sensor_msgs/msg/Image (rgb8)."""
    types = typestore().types
    header = types["std_msgs/msg/Header"](stamp=make_stamp(stamp_nanoseconds), frame_id=frame_id)
    height, width = pixels.shape[:2]
    return types[IMAGE_TYPE](header=header, height=height, width=width, encoding="rgb8", is_bigendian=0,
                             step=width * 3, data=np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1))


def vector_message(values: np.ndarray):
    types = typestore().types
    dim = types["std_msgs/msg/MultiArrayDimension"](label="goal", size=len(values), stride=len(values))
    layout = types["std_msgs/msg/MultiArrayLayout"](dim=[dim], data_offset=0)
    return types[VECTOR_TYPE](layout=layout, data=np.asarray(values, dtype=np.float32))
