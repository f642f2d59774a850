"""evaluate prints each line once: N workers warn alike, and episodes fail alike."""
import logging
import warnings

import numpy as np

from selfflow_robot.evaluation import runner
from selfflow_robot.evaluation.worker import _forward_messages


class Queue(list):
    put = list.append


def test_a_workers_warnings_and_log_lines_go_to_the_parent(capsys):
    q, root = Queue(), logging.getLogger()
    handlers, show, fmt = list(root.handlers), warnings.showwarning, warnings.formatwarning
    try:
        _forward_messages(q)
        logging.getLogger("selfflow_robot.policies").warning("stretched %s", "frames")
        warnings.warn("advice", UserWarning)
    finally:
        root.handlers[:] = handlers
        warnings.showwarning, warnings.formatwarning = show, fmt
    assert q[0] == ("log", ("selfflow_robot.policies", logging.WARNING, "stretched frames"), None)
    assert q[1][0] == "warning" and "advice" in q[1][1]
    assert "stretched" not in capsys.readouterr().err  # the worker itself prints nothing


def test_the_parent_says_each_workers_line_once(caplog, capsys):
    said = set()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two workers
            runner.say_once("log", ("selfflow_robot.policies", logging.WARNING, "stretched"), said)
            runner.say_once("warning", "warning: advice\n", said)
    assert [r.getMessage() for r in caplog.records] == ["stretched"]
    assert capsys.readouterr().err == "warning: advice\n"


def test_an_error_repeated_by_every_episode_is_printed_once(tmp_path, monkeypatch, capsys):
    class Env:
        def reset(self, seed=None, options=None):
            raise ValueError('The camera "nosuchcam" does not exist.')

        def close(self):
            pass

    class Random:
        def reset(self, instruction=None):
            pass

        def act(self, obs):
            return np.zeros(4, np.float32)

    eps = [dict(key=f"t|seed={i}", task="t", subtask="t", variant="default", episode_id=f"seed={i}", seed=i, video=False)
           for i in range(3)]
    monkeypatch.setattr(runner, "build_episodes", lambda cfg: eps)
    monkeypatch.setattr(runner, "_preflight", lambda cfg: None)
    monkeypatch.setattr("selfflow_robot.evaluation.worker.make_env", lambda *a: Env())
    s = runner.evaluate({"env": {"name": "metaworld"}, "policy": Random(), "out_dir": str(tmp_path), "progress": False})
    out = capsys.readouterr()
    assert s["throughput"]["errors"] == 3
    assert (out.out + out.err).count('does not exist') == 1 and (out.out + out.err).count("the same error") == 2
