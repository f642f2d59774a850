"""LeRobot plugin for selfflow-robot policies (`--policy.type=selfflow`).

LeRobot imports this module (its distribution name starts with lerobot_policy_); importing the
config registers the policy type, and LeRobot finds SelfFlowPolicy in modeling_selfflow and
make_selfflow_pre_post_processors in processor_selfflow by its naming convention.
"""
from .configuration_selfflow import SelfFlowConfig
from .processor_selfflow import SelfFlowNormalizerStep, SelfFlowUnnormalizerStep  # registers the steps

__all__ = ["SelfFlowConfig", "SelfFlowNormalizerStep", "SelfFlowUnnormalizerStep"]
