"""Shared by the SIMPLER tests: the backends to run against (double always, real if installed)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

DOUBLE_DIR = str(Path(__file__).resolve().parent)
if DOUBLE_DIR not in sys.path:
    sys.path.insert(0, DOUBLE_DIR)

REAL = "mani_skill2_real2sim"
BACKENDS = ["fake_simpler_env", pytest.param(REAL, marks=pytest.mark.skipif(
    importlib.util.find_spec(REAL) is None, reason="SIMPLER (ManiSkill2_real2sim) not installed"))]
# Rasterised tasks only: the ray-traced drawer/apple scenes do not run without an RTX GPU.
GOOGLE_TASK, WIDOWX_TASK = "google_robot_pick_coke_can", "widowx_carrot_on_plate"
