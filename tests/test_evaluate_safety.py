"""evaluate reports what the policy's safety layer did: a NaN checkpoint scores 0% because every step
was held, which the summary (json/md/csv) and a warning must say, for in-process and ws:// policies."""
import csv
import logging

import numpy as np
import pytest

from selfflow_robot.evaluation.rollout import run_episode
from selfflow_robot.evaluation.summary import summarize, to_markdown, write_summary
from selfflow_robot.policies import Policy, SafetyConfig
from selfflow_robot.policies.client import WebsocketClientPolicy
from selfflow_robot.policies.server import PolicyServer

NORM = {"mode": "q99", "action": {"q01": [-1.0, -1.0], "q99": [1.0, 1.0]}}
EP = dict(key="t|seed=0", task="t", subtask="t", variant="default", episode_id="seed=0", seed=0)


class Env:
    """Ends after 6 steps; never succeeds."""

    def reset(self, seed=None, options=None):
        self.t = 0
        return {"image": np.zeros((8, 8, 3), np.uint8), "instruction": "go"}, {}

    def step(self, action):
        self.t += 1
        return {"image": np.zeros((8, 8, 3), np.uint8), "instruction": "go"}, 0.0, False, self.t >= 6, {"success": False}

    def close(self):
        pass


def nan_model(obs):
    return np.full((4, 2), np.nan, np.float32)


def big_model(obs):  # finite, beyond the bounds below in dim 0
    return np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [5.0, 0.0]], np.float32)


def test_a_nan_policy_is_held_every_step_and_the_record_says_so():
    rec, _ = run_episode(Env(), Policy(nan_model, {"action_dim": 2}, NORM), EP, "final_step")
    assert (rec["steps"], rec["held_steps"], rec["clipped_steps"]) == (6, 6, 0)
    safety = SafetyConfig(action_low=[-1.0, -1.0], action_high=[1.0, 1.0], normalized_clip=None)
    rec, _ = run_episode(Env(), Policy(big_model, {"action_dim": 2}, None, safety=safety), EP, "final_step")
    assert (rec["held_steps"], rec["clipped_steps"]) == (0, 6)  # every step comes from a clipped chunk


def test_policies_without_a_safety_layer_report_no_counts():
    class Expert:
        def reset(self, instruction=None):
            pass

        def act(self, obs):
            return np.zeros(2, np.float32)

    rec, _ = run_episode(Env(), Expert(), EP, "final_step")
    assert "held_steps" not in rec and "safety" not in summarize([rec], {"env": {"name": "metaworld"}, "policy": "x"}, 1)


def test_the_summary_counts_held_and_clipped_steps_and_warns(tmp_path):
    recs = [dict(EP, key=f"{t}|{i}", task=t, success=False, steps=10, held_steps=h, clipped_steps=c)
            for i, (t, h, c) in enumerate([("a", 10, 0), ("a", 10, 0), ("b", 0, 3)])]
    s = summarize(recs, {"env": {"name": "metaworld"}, "policy": "p"}, 3)
    assert s["safety"] == {"steps": 30, "held_steps": 20, "clipped_steps": 3}
    assert (s["tasks"]["a"]["held_steps"], s["tasks"]["b"]["clipped_steps"]) == (20, 3)
    md = to_markdown(s)
    assert "| held steps | clipped steps |" in md and "20 of 30" in md and "warning:** the safety layer held 20 of 30" in md
    rows = list(csv.DictReader(open(write_summary(s, str(tmp_path))["csv"])))
    assert [(r["task"], r["held_steps"], r["clipped_steps"]) for r in rows] == [("a", "20", "0"), ("b", "0", "3"),
                                                                              ("total", "20", "3")]


@pytest.fixture()
def nan_server():
    s = PolicyServer(Policy(nan_model, {"action_dim": 2}, NORM), port=0)
    s.start_in_thread()
    yield s
    s.stop()


def test_a_served_nan_policy_is_counted_from_the_servers_flags(nan_server):
    with WebsocketClientPolicy(f"ws://127.0.0.1:{nan_server.port}") as c:
        rec, _ = run_episode(Env(), c, EP, "final_step")
    assert (rec["steps"], rec["held_steps"]) == (6, 6)


def test_evaluate_warns_when_the_safety_layer_held_steps(tmp_path, caplog, monkeypatch):
    from selfflow_robot.evaluation import runner

    monkeypatch.setattr(runner, "build_episodes", lambda cfg: [dict(EP, video=False)])
    monkeypatch.setattr(runner, "_preflight", lambda cfg: None)
    monkeypatch.setattr("selfflow_robot.evaluation.worker.make_env", lambda *a: Env())
    with caplog.at_level(logging.WARNING, logger="selfflow_robot"):
        s = runner.evaluate({"env": {"name": "metaworld"}, "policy": Policy(nan_model, {"action_dim": 2}, NORM),
                             "out_dir": str(tmp_path), "progress": False})
    assert s["safety"]["held_steps"] == 6 and "safety layer held 6 of 6 steps" in caplog.text
