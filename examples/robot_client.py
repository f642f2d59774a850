"""A robot-side control loop against `python -m selfflow_robot.serve`: stream camera frames and the
robot state, execute actions at a fixed rate, and keep the arm safe when the network is not.

    python -m selfflow_robot.serve policy=runs/my_policy host=0.0.0.0        # on the GPU box
    python examples/robot_client.py --url ws://gpu-box:8000 --hz 10 --instruction "pick up the cube"

Needs only numpy, msgpack and websockets (`pip install --no-deps .` in a selfflow-robot checkout,
plus those three).
Replace `FakeRobot` with your driver: `observe()` returns {"image": uint8 [H, W, 3], "state":
float32 [S]} (plus "images": {"wrist": ...} for a two-camera policy), `command(action)` sends one
action, `hold()` stops the arm.

- Asynchronous inference (`--refill-below`): the next chunk is computed while queued actions run.
- Client-side safety (`--max-delta`): per-step change limit on the actions actually executed.
- Watchdog (`--deadline`): if no action was sent for that long (a slow network, a stuck server),
  the robot is told to hold until commands resume.
- Lost server (`--reconnect-timeout`): the robot holds while the client reconnects, and the loop
  resumes when the server is back; after that many seconds it gives up. Whatever ends the loop
  (done, an error, Ctrl-C), the robot is told to hold.
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from selfflow_robot.policies import ChunkConfig, SafetyConfig
from selfflow_robot.policies.client import PolicyServerError, WebsocketClientPolicy, check_url


class FakeRobot:
    """Stands in for a driver: a noise camera and a state that integrates the commanded actions."""

    def __init__(self, image_size, state_dim: int, extra_views=()):
        self.image_size, self.state = tuple(image_size), np.zeros(state_dim, np.float32)
        self.extra_views, self.rng, self.holds = list(extra_views), np.random.default_rng(0), 0

    def observe(self) -> dict:
        img = lambda: self.rng.integers(0, 256, (*self.image_size, 3), dtype=np.uint8)  # noqa: E731
        obs = {"image": img(), "state": self.state.copy()}
        if self.extra_views:
            obs["images"] = {name: img() for name in self.extra_views}
        return obs

    def command(self, action: np.ndarray) -> None:
        n = min(len(self.state), len(action))
        self.state[:n] += 0.01 * action[:n]

    def hold(self) -> None:
        self.holds += 1


class Watchdog(threading.Thread):
    """Calls robot.hold() whenever no command went out for `deadline` seconds."""

    def __init__(self, robot, deadline: float):
        super().__init__(daemon=True)
        self.robot, self.deadline = robot, deadline
        self.last, self.stopped = time.monotonic(), threading.Event()

    def fed(self) -> None:
        self.last = time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(self.deadline / 4):
            if time.monotonic() - self.last > self.deadline:
                self.robot.hold()
                self.last = time.monotonic()  # hold once per missed deadline


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """argparse errors (exit code 2) naming the flag and its valid range, before anything connects."""
    finite = lambda v: v == v and abs(v) != float("inf")  # noqa: E731
    checks = [("--hz", args.hz, finite(args.hz) and args.hz > 0, "a control rate in Hz > 0"),
              ("--steps", args.steps, args.steps >= 0, "an integer >= 0"),
              ("--refill-below", args.refill_below, 0 <= args.refill_below < 1,
               "a fraction in [0, 1) (0 = synchronous inference)"),
              ("--execute-steps", args.execute_steps, args.execute_steps is None or args.execute_steps >= 1,
               "an integer >= 1"),
              ("--max-delta", args.max_delta, args.max_delta is None or (finite(args.max_delta) and args.max_delta > 0),
               "a per-step change > 0 in robot units"),
              ("--deadline", args.deadline, finite(args.deadline) and args.deadline > 0, "seconds > 0"),
              ("--reconnect-timeout", args.reconnect_timeout,
               finite(args.reconnect_timeout) and args.reconnect_timeout >= 0, "seconds >= 0")]
    for flag, value, ok, valid in checks:
        if not ok:
            ap.error(f"argument {flag}: must be {valid}, got {value:g}")
    try:
        check_url(args.url)
    except ValueError as e:
        ap.error(f"argument --url: {e}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="ws://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None, help="default: $SELFFLOW_API_KEY (keeps the key out of `ps`)")
    ap.add_argument("--instruction", default="pick up the cube")
    ap.add_argument("--hz", type=float, default=10.0, help="control rate")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--refill-below", type=float, default=0.5, help="asynchronous inference threshold, in [0, 1) (0 = off)")
    ap.add_argument("--execute-steps", type=int, default=None, help="actions run per chunk (default: all)")
    ap.add_argument("--max-delta", type=float, default=None, help="per-step action change limit")
    ap.add_argument("--deadline", type=float, default=1.0, help="seconds without an action before holding")
    ap.add_argument("--reconnect-timeout", type=float, default=30.0,
                    help="seconds to keep reconnecting to a lost server (the robot holds meanwhile)")
    args = ap.parse_args(argv)
    check_args(ap, args)

    try:
        policy = WebsocketClientPolicy(args.url, api_key=args.api_key, wait_for_server=30,
                                       chunk=ChunkConfig(execute_steps=args.execute_steps),
                                       safety=SafetyConfig(max_delta=args.max_delta) if args.max_delta else None,
                                       refill_below=args.refill_below or None)
    except (PermissionError, ConnectionError, ValueError) as e:  # a wrong key, no server: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: cannot reach {args.url} ({e.strerror or e})") from None
    meta = policy.metadata
    views = meta.get("views") or []
    h, w = meta.get("image_size") or [256, 320]
    robot = FakeRobot((h, w // max(len(views), 1)), int(meta.get("state_dim") or 0), views[1:])
    print(f"connected to {args.url}: {meta.get('model')} policy, {meta.get('action_dim')}-d actions, "
          f"chunks of {meta.get('action_chunk')}, cameras {views or ['image']}")
    watchdog = Watchdog(robot, args.deadline)
    watchdog.start()
    period, late, outages, t_next = 1.0 / args.hz, 0, 0, time.monotonic()
    lost_since, reply_at_loss = None, None  # when the server stopped answering; its last reply then
    try:
        policy.reset(args.instruction)
        step = 0
        while step < args.steps:
            try:
                action = policy.act(robot.observe())
            except PermissionError as e:  # the key was changed under a reconnect: retrying cannot help
                raise SystemExit(f"error: {e}; the robot holds") from None
            except (ConnectionError, TimeoutError, OSError) as e:  # the client reconnects on the next call
                robot.hold()
                if lost_since is None:
                    lost_since, outages, reply_at_loss = time.monotonic(), outages + 1, policy.last_timing
                    print(f"lost {args.url} ({e}); the robot holds while reconnecting")
                if time.monotonic() - lost_since > args.reconnect_timeout:
                    raise SystemExit(f"error: {args.url} did not come back within {args.reconnect_timeout:g} s; "
                                     "the robot holds") from None
                time.sleep(min(0.5, args.reconnect_timeout / 10))
                t_next = time.monotonic()
                continue
            except PolicyServerError as e:  # the server refused the request: retrying sends the same one
                raise SystemExit(f"error: the policy server refused a request ({e}); the robot holds") from None
            if lost_since is not None and policy.last_timing is not reply_at_loss:  # a reply came: it is back
                print(f"reconnected after {time.monotonic() - lost_since:.1f} s")
                lost_since = None
            robot.command(action)
            watchdog.fed()
            step += 1
            t_next += period
            pause = t_next - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:  # the loop overran its period: note it, do not try to catch up
                late, t_next = late + 1, time.monotonic()
        summary = {"steps": args.steps, "late_steps": late, "starved_steps": policy.starved_steps,
                   "holds": robot.holds, "outages": outages,
                   "last_roundtrip_ms": round(policy.last_timing.get("roundtrip_ms", 0.0), 1)}
    finally:
        watchdog.stopped.set()
        robot.hold()  # done, failed or interrupted: the arm must not keep executing its last command
        policy.close()
    print(summary)
    return summary


if __name__ == "__main__":
    main()
