"""The adapter side of SIMPLER stays light: no torch, gym ids registered, old-version-safe APIs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym

ENVS = Path(__file__).resolve().parents[1] / "envs"


def test_imports_without_torch_simpler_or_metaworld():
    code = ("import sys\n"
            "for m in ('torch', 'mani_skill2_real2sim', 'simpler_env', 'metaworld', 'mujoco'):\n"
            "    sys.modules[m] = None  # any import of these now fails\n"
            "import gymnasium as gym\n"
            "import selfflow_robot.envs as e, selfflow_robot.envs.simpler, selfflow_robot.envs.simpler_metrics\n"
            "import selfflow_robot.envs.simpler_plans\n"
            "assert e.SIMPLER_ID in gym.envs.registry and e.METAWORLD_ID in gym.envs.registry\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_registered_simpler_id_builds_the_adapter():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "simpler_double"))
    import selfflow_robot.envs  # noqa: F401
    env = gym.make("selfflow/Simpler-v0", task="widowx_stack_cube", backend="fake_simpler_env", image_size=(32, 32))
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (32, 32, 3) and obs["instruction"] == "stack the green block on the yellow block"
    env.close()


def test_no_numpy2_or_gymnasium1_only_apis():
    banned = [r"np\.trapezoid", r"np\.unstack", r"np\.concat\(", r"np\.isdtype", r"np\.astype\(", r"np\.bitwise_count",
              r"np\.cumulative_sum", r"gym\.wrappers\.vector", r"gym\.make_vec", r"np\.long\b", r"^\s*(import|from) torch"]
    for path in ENVS.glob("simpler*.py"):
        text = path.read_text()
        for pat in banned:
            assert not re.search(pat, text, re.M), f"{path.name} uses {pat}"
    for name in ("rotations.py", "__init__.py"):
        assert not re.search(r"^\s*(import|from) torch", (ENVS / name).read_text(), re.M)
