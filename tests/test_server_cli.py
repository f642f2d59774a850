"""`python -m selfflow_robot.serve` end to end: a tiny random-weight checkpoint, real model code."""
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from selfflow_robot.cli import compose


def test_serve_config_defaults():
    cfg = compose("serve", ["policy=x"])
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and cfg.api_key is None
    assert cfg.safety.normalized_clip == "auto" and cfg.chunk.execute_steps is None
    assert compose("serve", ["policy=x", "api_key=k", "port=0"]).api_key == "k"


def test_serve_missing_checkpoint_names_it(tmp_path):
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.serve", f"policy={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "holds no checkpoint" in r.stderr and str(tmp_path) in r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr  # one line, not a stack


def test_a_port_in_use_is_named_before_the_model_loads(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a missing checkpoint would fail later, in loading: the port is checked first
        r = subprocess.run([sys.executable, "-m", "selfflow_robot.serve", f"policy={tmp_path / 'nope'}", f"port={port}"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith(f"error: port {port} on 127.0.0.1 is in use")


def test_a_port_just_freed_by_a_stopped_server_is_free():
    """A server stopped while a robot was connected leaves its port in TIME_WAIT for ~60 s; the real
    server binds with SO_REUSEADDR, so the check must too (it refused restarts for a minute)."""
    import socket

    from selfflow_robot.serve import check_port_free

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            conn.close()  # the server side closes first: its end of the connection sits in TIME_WAIT
            client.recv(1)
    check_port_free("127.0.0.1", port)


@pytest.mark.parametrize("typo", ["devise=cpu", "+devise=cpu"])
def test_a_misspelt_option_is_one_line_with_a_suggestion(typo):
    """Hydra's own message suggests `+devise=cpu`, which started the server with the option ignored."""
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.serve", "policy=x", typo],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: unknown option devise (did you mean device?); `--help` lists the options"


def test_help_lists_only_the_groups_a_command_reads():
    """Hydra's help listed every group of the shared configs/ folder (serve offered dataset=,
    objective=, trainer=, ... none of which it reads) and dropped the configs' comments."""
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.serve", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m selfflow_robot.serve [key=value ...]")
    assert "dataset" not in r.stdout and "# python -m selfflow_robot.serve policy=PATH" in r.stdout
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.finetune", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "  dataset: bridge, lerobot, [metaworld], rt1, store, video_folder" in r.stdout
    assert "env:" not in r.stdout and "model=s (configs/model/s.yaml; set its keys as model.KEY)" in r.stdout


@pytest.mark.parametrize("args,message", [
    # suggestions come from the dataset chosen on the command line, not the default (Meta-World) one
    (["dataset=rt1", "dataset.on_eror=skip"], "unknown option dataset.on_eror (did you mean dataset.on_error?)"),
    (["dataset=rt1", "dataset.rlds.imag=x"], "unknown option dataset.rlds.imag (did you mean dataset.rlds.image?)"),
    (["dataset=rt1", "dataset.camera=wrist"], "unknown option dataset.camera (did you mean dataset.rlds.image?)"),
    (["dataset=lerobot", "dataset.camera=a,b"], "write a list as key=[a,b]"),
])
def test_option_mistakes_get_advice_for_the_chosen_groups(args, message):
    from selfflow_robot.cli import check_overrides

    with pytest.raises(SystemExit, match=re.escape(message)):
        check_overrides("finetune", args)


@pytest.mark.timeout(150)
def test_serve_end_to_end(tmp_path, monkeypatch):
    try:
        from selfflow_robot.models import build_model, load_checkpoint_model  # noqa: F401
        from selfflow_robot.sampling import ActionSampler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"model code not available yet ({e})")
    from selfflow_robot.policies.bench import random_checkpoint
    from selfflow_robot.policies.client import WebsocketClientPolicy

    # with a state input: warm-up and clients must send it
    ckpt = random_checkpoint("tiny", str(tmp_path / "ckpt"), (32, 32), action_dim=4, action_chunk=3, patch_size=8,
                             state_dim=5)
    env = {**os.environ, "SELFFLOW_API_KEY": "k3y", "PYTHONUNBUFFERED": "1"}
    monkeypatch.chdir(tmp_path)  # anything Hydra might write lands here
    proc = subprocess.Popen([sys.executable, "-m", "selfflow_robot.serve", f"policy={ckpt}", "port=0",
                             "sampler_steps=2", "safety.max_delta=0.5"],
                            stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        port, deadline, seen = None, time.time() + 90, []
        while port is None and time.time() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            m = re.search(r"ws://127\.0\.0\.1:(\d+)", seen[-1])
            port = int(m.group(1)) if m else None
        assert port, f"server did not report its port (exit {proc.poll()}):\n{''.join(seen)[-3000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(PermissionError):
            WebsocketClientPolicy(f"ws://127.0.0.1:{port}")
        with WebsocketClientPolicy(f"ws://127.0.0.1:{port}", api_key="k3y") as c:
            assert c.metadata["action_dim"] == 4 and c.metadata["action_chunk"] == 3
            assert c.metadata["safety"]["max_delta"] == 0.5
            c.reset("pick")
            with pytest.raises(RuntimeError, match=r"invalid_observation.*needs obs\['state'\]"):
                c.infer({"image": np.zeros((48, 64, 3), np.uint8)})
            r = c.infer({"image": np.zeros((48, 64, 3), np.uint8), "state": np.zeros(5, np.float32)})
            assert r["actions"].shape == (3, 4) and np.all(np.isfinite(r["actions"]))
            assert np.all(np.abs(np.diff(r["actions"], axis=0)) <= 0.5 + 1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no log files or output dirs left behind


def test_override_errors_are_one_line():
    from selfflow_robot.cli import check_overrides

    for override, message in (("model=nope", "error: Could not find 'model/nope'; choose from b, l, s, selfflow_xl, tiny, xl"),
                              ("trainer.stesp=1", "error: unknown option trainer.stesp (did you mean trainer.steps?)"),
                              ("+bogus=1", "error: unknown option bogus; `--help` lists the options")):
        with pytest.raises(SystemExit) as e:
            check_overrides("finetune", [override])
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert check_overrides("finetune", ["model=s", "model.qk_norm=true"]).model.qk_norm is True


def test_our_warnings_print_as_one_warning_line():
    import warnings

    from selfflow_robot import cli, jobs

    saved = warnings.formatwarning
    try:
        cli.short_warnings()
        ours = warnings.formatwarning("advice", UserWarning, jobs.__file__, 1, "trainer = Trainer(...)")
        other = warnings.formatwarning("advice", UserWarning, "/site-packages/torch/x.py", 1, "code()")
    finally:
        warnings.formatwarning = saved
    assert ours == "warning: advice\n"
    assert "x.py:1: UserWarning: advice" in other  # everyone else's keep Python's format


@pytest.mark.parametrize("args,message", [
    (["selfflow_robot.serve"], "error: policy is not set: pass policy="),
    (["selfflow_robot.predict"], "error: policy is not set: pass policy=..."),
    (["selfflow_robot.curves"], "error: runs is not set: pass runs=..."),
    (["selfflow_robot.serve", "policy=x", "port=-5"], "error: port=-5: must be in 1..65535"),
    (["selfflow_robot.predict", "policy=x", "device=gpu"], "error: device=gpu: not a device; use auto, cpu, cuda"),
    (["selfflow_robot.data", "stat"], "error: unknown command 'stat' (did you mean stats?); expected one of"),
])
def test_missing_or_impossible_settings_are_one_line(args, message):
    """A required key left unset, a port out of range, a device name torch does not know: one line."""
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith(message) and "Traceback" not in r.stderr, r.stderr


def test_a_device_this_machine_lacks_is_named_before_loading(monkeypatch):
    import torch

    from selfflow_robot.train.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device=cuda: .*use device=cpu"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


@pytest.mark.parametrize("args,message", [
    (["dataset=lerobot", "+dataset.epsiodes=3"], "unknown option dataset.epsiodes (did you mean dataset.max_episodes?)"),
    (["dataset=store", "+dataset.on_error=skip"],
     "unknown option dataset.on_error; nothing reads it with dataset=store (only dataset=bridge, dataset=lerobot"),
    (["+clip.image_sise=[32,32]"], "unknown option clip.image_sise (did you mean clip.image_size?)"),
])
def test_an_added_key_that_nothing_reads_is_refused(args, message):
    from selfflow_robot.cli import check_overrides

    with pytest.raises(SystemExit, match=re.escape(message)):
        check_overrides("finetune", args)
    assert check_overrides("finetune", ["model=tiny", "+model.student_layer=1"]).model.student_layer == 1  # a field


@pytest.mark.parametrize("flags", [["-m", "port=1,2"], ["--cfg", "job"], ["--cfg=job", "--resolve"]])
def test_keys_are_checked_under_multirun_and_cfg_too(flags):
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.serve", *flags, "policy=x", "+devise=cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: unknown option devise (did you mean device?)")


def test_overrides_to_check_skips_hydra_flags_and_takes_a_sweeps_first_value():
    from selfflow_robot.cli import _overrides_to_check

    assert _overrides_to_check(["-m", "a=1,2", "+b.c=x", "--cfg", "job"]) == ["a=1", "+b.c=x"]
    assert _overrides_to_check(["--cfg", "job", "a=1,2"]) == ["a=1,2"]  # not a sweep without -m: Hydra says so
    assert _overrides_to_check(["--config-name", "other", "a=1"]) is None
