"""A small real Meta-World collection: experts, rendering, workers, resume, store round trip."""
import json
import os
import subprocess
import sys

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import numpy as np
import pytest

pytest.importorskip("metaworld")
pytestmark = pytest.mark.sim

from selfflow_robot.collect import collect_metaworld, resolve_tasks, rollout
from selfflow_robot.data import ClipDataset, EpisodeStore, open_store
from selfflow_robot.envs.metaworld import MT10_TASKS, TASK_INSTRUCTIONS

KW = dict(image_size=(32, 32), action_repeat=4, max_steps=30, progress=False)


def test_resolve_tasks():
    assert resolve_tasks("mt10") == MT10_TASKS and len(resolve_tasks("MT50")) == 50
    assert resolve_tasks("reach-v3, push-v3") == ["reach-v3", "push-v3"]
    with pytest.raises(ValueError, match="reach-v7"):
        resolve_tasks(["reach-v7"])


def test_collect_with_workers_round_trips_and_resumes(tmp_path):
    out = str(tmp_path / "mw")
    s = collect_metaworld(out, tasks=["reach-v3", "drawer-close-v3"], episodes_per_task=2, workers=2, **KW)
    assert s["stored"] == 4 and not s["tasks_short"]
    store = EpisodeStore(out)
    assert len(store) == 4 and store.meta["action_dim"] == 4 and store.meta["image_shape"] == [32, 32, 3]
    assert store.meta["fps"] == 20.0 and store.meta["action_mask"] == [True, True, True, False]
    keys = sorted(store.key(i) for i in range(4))
    assert keys == ["drawer-close-v3/seed000000", "drawer-close-v3/seed000001", "reach-v3/seed000000",
                    "reach-v3/seed000001"]
    for i in range(4):
        ep = store.episode(i)
        task = ep["key"].split("/")[0]
        assert ep["instruction"] == TASK_INSTRUCTIONS[task]
        assert 3 <= len(ep["actions"]) < 30, "kept episodes end on success before max_steps"
        assert ep["images"].std() > 0 and ep["state"].shape == (len(ep["actions"]), 4)
        assert np.abs(ep["actions"]).max() <= 1.0
        # Same seed, same episode: the stored data is the expert rollout itself.
        again = rollout(task, int(ep["key"][-6:]), image_size=(32, 32), action_repeat=4, max_steps=30)
        np.testing.assert_allclose(again["actions"], ep["actions"], atol=1e-6)
        np.testing.assert_array_equal(again["images"], ep["images"])
    before = os.listdir(out)
    s2 = collect_metaworld(out, tasks=["reach-v3", "drawer-close-v3"], episodes_per_task=2, workers=0, **KW)
    assert s2["stored"] == 0 and s2["already_stored"] == 4 and sorted(os.listdir(out)) == sorted(before)
    ds = ClipDataset(store, context_frames=2, future_frames=2, action_chunk=6)
    item = ds[0]
    assert item["context"].shape == (2, 32, 32, 3) and item["actions"].shape == (6, 4)


def test_open_store_collects_metaworld_on_first_use(tmp_path):
    cfg = dict(name="metaworld", source="metaworld", store_dir=str(tmp_path / "auto"), tasks="reach-v3",
               episodes_per_task=1, image_size=[24, 24], camera="corner", action_repeat=4, max_steps=30,
               seed=5, workers=0, progress=False)
    store = open_store(cfg)
    assert len(store) == 1 and store.key(0) == "reach-v3/seed000005"
    assert json.loads((tmp_path / "auto" / "conversion.json").read_text())["complete"]
    assert len(open_store(cfg)) == 1


def test_collect_cli(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.collect", "env=metaworld", "tasks=[reach-v3]",
                        "episodes_per_task=1", "image_size=[16,16]", "workers=0", "progress=false", f"out={out}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{")))
    assert summary["stored"] == 1 and len(EpisodeStore(out)) == 1
    done = json.loads((out / "conversion.json").read_text())  # finished: `dataset=...` opens it as is
    assert done["complete"] and done["summary"]["stored"] == 1
