"""Launch the CFGRL policy node (`cfgrl`, executable cfgrl_node) with a params file.

    ros2 launch cfgrl_ros policy.launch.py policy:=/path/policy.safetensors \
        namespace:=robot1 camera_topic:=/camera/color/image_raw goal_vector_topic:=/task/goal w:=3.0

Arguments:
  params_file        parameters (default: the installed config/cfgrl.yaml, which matches any namespace)
  policy             checkpoint path; empty keeps the params file's value
  namespace          namespace of the node and of its relative topics
  camera_topic       remap of camera/image (and of camera/image/compressed to <camera_topic>/compressed)
  camera_transport   raw or compressed (CompressedImage on <camera_topic>/compressed); empty keeps the params file's
  goal_image_topic   remap of goal/image (image-goal policies)
  goal_vector_topic  remap of goal/vector (oracle-goal policies)
  action_topic       remap of action
  w                  guidance weight override; empty keeps the params file's value
  use_sim_time       follow /clock
  log_level          node log level
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    "params_file": (PathJoinSubstitution([FindPackageShare("cfgrl_ros"), "config", "cfgrl.yaml"]),
                    "Parameters file of the node."),
    "policy": ("", "Checkpoint (.safetensors); empty keeps the params file's value."),
    "namespace": ("", "Namespace of the node and its topics."),
    "camera_topic": ("camera/image", "Camera topic (sensor_msgs/Image); its /compressed for camera_transport compressed."),
    "camera_transport": ("", "raw or compressed; empty keeps the params file's value."),
    "goal_image_topic": ("goal/image", "Goal image topic (image-goal policies)."),
    "goal_vector_topic": ("goal/vector", "Goal vector topic (oracle-goal policies)."),
    "action_topic": ("action", "Action topic (cfgrl_ros/PolicyAction)."),
    "w": ("", "Guidance weight; empty keeps the params file's value."),
    "use_sim_time": ("false", "Use /clock."),
    "log_level": ("info", "Log level of the node."),
}


def policy_node(context, *_, **__) -> list:
    value = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    # Only what was given overrides the params file (later entries in `parameters` win).
    use_sim_time = value["use_sim_time"].strip().lower()
    if use_sim_time not in ("true", "false", "1", "0", "yes", "no"):  # a typo must not mean false
        raise ValueError(f"launch argument use_sim_time:={value['use_sim_time']!r} is not true or false")
    overrides = {"use_sim_time": use_sim_time in ("true", "1", "yes")}
    if value["policy"]:
        overrides["policy"] = value["policy"]
    if value["w"]:
        overrides["w"] = float(value["w"])
    if value["camera_transport"]:
        overrides["camera_transport"] = value["camera_transport"]
    return [Node(
        package="cfgrl_ros",
        executable="cfgrl_node",
        name="cfgrl",
        namespace=value["namespace"],
        parameters=[value["params_file"], overrides],
        remappings=[
            ("camera/image", value["camera_topic"]),
            ("camera/image/compressed", value["camera_topic"].rstrip("/") + "/compressed"),  # image_transport's name
            ("goal/image", value["goal_image_topic"]),
            ("goal/vector", value["goal_vector_topic"]),
            ("action", value["action_topic"]),
        ],
        ros_arguments=["--log-level", value["log_level"]],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in ARGUMENTS.items()]
        + [OpaqueFunction(function=policy_node)])
