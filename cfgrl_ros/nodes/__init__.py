"""ROS 2 nodes: thin wrappers that need rclpy; their logic lives in the ROS-free cfgrl_ros modules."""
