"""Test double of SIMPLER (ManiSkill2_real2sim), built from its documented API only.

It mirrors what the adapter relies on (ManiSkill2_real2sim ef7a4d4, checked against it by tests/test_simpler_real.py): gym ids with their
registered step limits, constructor kwargs (unknown ones raise TypeError), the rgbd observation
dict layout, `info` keys, instructions and subtask methods, and the two controllers' conventions
(Google Robot relative gripper, +closes; WidowX absolute gripper, +1 open). Physics is a toy
kinematic point: success = the TCP is lifted more than 5 cm above its start.
Registered under the gym namespace GYM_NAMESPACE so it can never shadow a real install.
"""
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "data"
GYM_NAMESPACE = "FakeSimpler"
