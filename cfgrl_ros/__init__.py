"""cfgrl_ros: visual goal-conditioned CFGRL policy (guided flow matching) and its ROS 2 nodes.

The core (model, sampler, engines) imports without rclpy; only cfgrl_ros.nodes needs ROS.
"""

__version__ = "0.1.0"

# cfgrl_ros is split over two directories: the generated messages (cfgrl_ros.msg) are installed
# into the venv's site-packages by the CMake message build, while tests and dev runs import this
# source tree first (PYTHONPATH). Under colcon, rosidl and ament_cmake_python write the same
# package directory too. extend_path lets `cfgrl_ros.msg` resolve from whichever one holds it.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)
