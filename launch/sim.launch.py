"""Launch the sim node (`cfgrl_sim`) and the policy node (`cfgrl`) together, with matching settings.

    ros2 launch cfgrl_ros sim.launch.py policy:=/path/policy.safetensors env_name:=visual-cube-single-v0 \
        clock:=lockstep w:=3.0 task_id:=2
    ros2 service call /reset std_srvs/srv/Trigger        # start an episode (autostart starts the first)
    ros2 topic echo /episode/result                      # success, steps, task

What "matching" means, per clock:
  lockstep  the sim publishes /clock and waits for each action; the policy runs on sim time
            (use_sim_time), acts on every image (trigger image, rate cap 1000 Hz) and never sends a
            stale-input stop (stale_action none), so one image gives exactly one action.
  realtime  both on the wall clock at control_rate_hz: the sim steps at that rate, the policy acts at
            that rate (trigger timer); stale-input stops (zeros) are applied like any action.

Arguments (each empty one keeps its params file's value):
  policy             checkpoint path
  env_name           OGBench visual env id (visual-cube-single-v0, visual-scene-v0, ...) or pointreach
  clock              lockstep | realtime
  control_rate_hz    realtime step rate (sim) and action rate (policy)
  task_id            task of the first episode (1-5); change it later with `ros2 param set /cfgrl_sim task_id N`
  max_episode_steps  episode limit; 0 keeps the env's own
  w                  guidance weight
  namespace          namespace of both nodes and their topics
  sim_params_file    default: the installed config/sim.yaml
  policy_params_file default: the installed config/cfgrl.yaml
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from cfgrl_ros.sim import params_file_section, sim_launch_parameters

ARGUMENTS = {
    "policy": ("", "Checkpoint (.safetensors); empty keeps the policy params file's value."),
    "env_name": ("", "OGBench visual env id or pointreach; empty keeps the sim params file's value."),
    "clock": ("", "lockstep (one step per action, /clock) or realtime (fixed rate); empty: the sim params file's."),
    "control_rate_hz": ("", "Real-time step and action rate; empty: the sim params file's."),
    "task_id": ("", "Task of the first episode, 1-5; empty: the sim params file's."),
    "max_episode_steps": ("", "Episode limit, 0 keeps the env's own; empty: the sim params file's."),
    "w": ("", "Guidance weight; empty keeps the policy params file's value."),
    "namespace": ("", "Namespace of both nodes and their topics."),
    "sim_params_file": (PathJoinSubstitution([FindPackageShare("cfgrl_ros"), "config", "sim.yaml"]),
                        "Parameters file of the sim node."),
    "policy_params_file": (PathJoinSubstitution([FindPackageShare("cfgrl_ros"), "config", "cfgrl.yaml"]),
                           "Parameters file of the policy node."),
}


def sim_and_policy_nodes(context, *_, **__) -> list:
    value = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    sim_file = params_file_section(value["sim_params_file"], "cfgrl_sim", value["namespace"])
    sim_overrides, policy_overrides = sim_launch_parameters(value, sim_file)
    if value["policy"]:
        policy_overrides["policy"] = value["policy"]
    if value["w"]:
        policy_overrides["w"] = float(value["w"])
    common = {"namespace": value["namespace"], "output": "screen", "emulate_tty": True}
    return [
        # The sim node owns /clock: it never runs on sim time itself.
        Node(package="cfgrl_ros", executable="cfgrl_sim_node", name="cfgrl_sim",
             parameters=[value["sim_params_file"], sim_overrides], **common),
        Node(package="cfgrl_ros", executable="cfgrl_node", name="cfgrl",
             parameters=[value["policy_params_file"], policy_overrides], **common),
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in ARGUMENTS.items()]
        + [OpaqueFunction(function=sim_and_policy_nodes)])
