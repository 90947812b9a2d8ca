"""Pure-Python install of cfgrl_ros on top of the PyPI ROS 2 wheels (scripts/setup.sh runs it).

On an apt/source ROS install colcon builds CMakeLists.txt instead (build_type ament_cmake).
Messages are not built here: CMake generates cfgrl_ros.msg into the same environment.
Dependencies are pinned in requirements.txt, so none are declared here.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "cfgrl_ros"
BUILD_DIR = "build/setuptools"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Visual goal-conditioned CFGRL policy and its ROS 2 nodes",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*", "training", "training.*"]),
    package_data={PACKAGE: ["data/*.safetensors", "data/*.md"]},
    # Registers the package in the ament index and ships what launch files look up by package.
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", sorted(glob("launch/*.py"))),
        (f"share/{PACKAGE}/config", sorted(glob("config/*.yaml"))),
    ],
    # setuptools never cleans its build directory (a deleted module would live on in the next
    # wheel) and writes its egg-info into the repo root, which is on PYTHONPATH in dev runs.
    # Both go to build/setuptools, which scripts/setup.sh deletes before each install. (Set here,
    # not in setup.cfg: ament_cmake_python would apply a setup.cfg to its own egg_info run.)
    options={"build": {"build_base": BUILD_DIR}, "egg_info": {"egg_base": BUILD_DIR}},
    entry_points={
        "console_scripts": [
            "cfgrl_node = cfgrl_ros.nodes.policy_node:main",
            "cfgrl_sim_node = cfgrl_ros.nodes.sim_node:main",
            "cfgrl_replay_node = cfgrl_ros.nodes.replay_node:main",
            "cfgrl-train = training.train:main",
            "cfgrl-evaluate = training.evaluate:main",
            "cfgrl-export = training.export:main",
            "cfgrl-generate = training.generate_dataset:main",
            "cfgrl-bags-to-dataset = training.bags_to_dataset:main",
            "cfgrl-benchmark = training.benchmark:main",
            "cfgrl-reproduce = training.reproduce:main",
            "cfgrl-ros-evaluate = training.ros_evaluate:main",
            "cfgrl_recorder = cfgrl_ros.nodes.recorder:main",
            "cfgrl_goal = cfgrl_ros.nodes.goal_publisher:main",
        ],
    },
)
