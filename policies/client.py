"""Websocket client for a policy server. Imports only numpy, msgpack, websockets and stdlib
(plus the numpy-only sibling modules), works with numpy >= 1.24 on Python 3.10+, so it runs
on a robot computer or inside a SimplerEnv venv without torch.

    policy = WebsocketClientPolicy("ws://127.0.0.1:8000", api_key=None)
    policy.reset("pick coke can")
    action = policy.act({"image": img_uint8_hw3, "state": state})   # float32 [A]

Asynchronous inference (`refill_below=0.5`, as LeRobot's async client): once the queue holds no
more than that fraction of a chunk, `act` sends the current observation in a background thread
and keeps returning queued actions; the reply is used from the step the robot has reached (the
actions meant for steps executed while it was computed are skipped). Only when the queue runs dry
does `act` wait (`starved_steps` counts those steps).
"""
from __future__ import annotations

import os
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import connect

from . import msgpack_numpy
from .chunking import ActionChunker, ChunkConfig
from .safety import COUNT_KEYS, SafetyConfig, SafetyFilter, add_counts


def _copy(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value


class PolicyServerError(RuntimeError):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def check_url(url: str) -> str:
    """`url` if it is ws://HOST[:PORT][/path] or wss://..., else a ValueError saying what to write."""
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme in ("ws", "wss") and parts.hostname:
        try:
            parts.port
        except ValueError as e:
            raise ValueError(f"policy server URL {url!r}: {e}; use ws://HOST:PORT") from None
        return url
    if parts.scheme in ("http", "https") and parts.netloc:
        hint = ("wss://" if parts.scheme == "https" else "ws://") + parts.netloc + parts.path
    elif "://" not in str(url) and str(url).strip():
        hint = "ws://" + str(url).strip()
    else:
        hint = "ws://HOST:PORT"
    raise ValueError(f"policy server URL {url!r} is not a websocket URL; use ws://HOST:PORT "
                     f"(or wss:// behind TLS), e.g. {hint}")


class WebsocketClientPolicy:
    def __init__(self, url: str = "ws://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30.0,
                 chunk: ChunkConfig | None = None, safety: SafetyConfig | None = None,
                 wait_for_server: float = 0.0, refill_below: float | None = None):
        """timeout: seconds for connect and for each reply. wait_for_server: keep retrying a refused
        connection this long (the server may still be loading the model). refill_below: asynchronous
        inference, requesting the next chunk in the background when at most this fraction of the
        current one is left (0 < refill_below < 1; None: synchronous, every chunk waits)."""
        if refill_below is not None and not 0 < float(refill_below) < 1:
            raise ValueError(f"refill_below must be in (0, 1) or None, got {refill_below}")
        self.refill_below = None if refill_below is None else float(refill_below)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-client") if refill_below else None
        self._pending: tuple[Future, int] | None = None  # (request in flight, step of its observation)
        self.starved_steps = 0
        self.url, self.timeout = check_url(url), float(timeout)
        api_key = api_key if api_key is not None else os.environ.get("SELFFLOW_API_KEY")  # as the server reads it
        self._headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._packer = msgpack_numpy.Packer()
        self._ws = None
        self.instruction: str | None = None
        self._connect(float(wait_for_server))
        self.action_dim = self.metadata.get("action_dim")
        self.chunker = ActionChunker(chunk or ChunkConfig())
        # Server-side safety already bounds each chunk; this re-applies bounds and per-step
        # deltas to the actions actually executed (they depend on ensembling done here).
        self.safety = SafetyFilter(safety, int(self.action_dim)) if safety is not None else None
        self.last_action: np.ndarray | None = None
        self.last_safety: dict = {"hold": False, "clipped": False, "delta_limited": False}
        self._chunk_safety: dict = {}
        self.last_timing: dict = {}
        self._counts = dict.fromkeys(COUNT_KEYS, 0)

    @property
    def safety_counts(self) -> dict:
        """As Policy.safety_counts, since the last reset: chunks the server held / clipped / delta-limited
        (from each reply's safety flags) and executed steps (this client's own safety, when given)."""
        return dict(self._counts)

    def _connect(self, wait_for_server: float = 0.0) -> None:
        t0 = time.monotonic()
        deadline = t0 + wait_for_server
        while True:
            try:
                # __enter__ gives the connection on websockets 12..17+ (17.1 deprecates using
                # connect()'s return value directly; entering it is the portable form).
                self._ws = connect(self.url, additional_headers=self._headers, compression=None, max_size=None,
                                   open_timeout=self.timeout, close_timeout=5).__enter__()
                break
            except InvalidStatus as e:
                code = getattr(getattr(e, "response", None), "status_code", None)
                if code in (401, 403):
                    raise PermissionError(f"{self.url} refused the connection (HTTP {code}); check api_key "
                                          "(or $SELFFLOW_API_KEY): it must match the server's") from e
                raise ConnectionError(f"{self.url} answered HTTP {code} instead of opening a websocket; "
                                      "is a policy server (python -m selfflow_robot.serve) running there?") from e
            except InvalidURI as e:
                raise ValueError(f"invalid policy server URL {self.url!r} ({e}); use ws://HOST:PORT") from e
            except (OSError, TimeoutError) as e:  # refused, unknown host, no route, handshake timeout
                if time.monotonic() >= deadline:
                    waited = f" after trying for {time.monotonic() - t0:.1f} s" if wait_for_server > 0 else ""
                    raise ConnectionError(f"could not reach the policy server at {self.url}{waited}: "
                                          f"{_reason(e)}; is python -m selfflow_robot.serve running there?") from e
                time.sleep(0.5)
            except WebSocketException as e:  # something answered, but not a websocket handshake
                raise ConnectionError(f"{self.url} did not answer as a policy server ({e})") from e
        try:
            self.metadata: dict = msgpack_numpy.unpackb(self._ws.recv(timeout=self.timeout))
        except (OSError, TimeoutError, WebSocketException) as e:
            self._drop()
            raise ConnectionError(f"{self.url} accepted the connection but sent no metadata "
                                  f"within {self.timeout:g} s ({_reason(e)})") from e

    def _drop(self) -> None:
        # After a timeout the late reply would be read as the answer to the next request,
        # so the connection is abandoned; the next call reconnects.
        try:
            self._ws.close()
        except Exception:
            pass
        self._ws = None

    def _call(self, request: dict) -> dict:
        if self._ws is None:
            self._connect()
        t0 = time.perf_counter()
        data = self._packer.pack(request)
        try:
            try:
                self._ws.send(data)
            except ConnectionClosed:  # closed by the server while idle (its idle_timeout_s): the request never left
                self._drop()
                self._connect()
                self._ws.send(data)
            reply = msgpack_numpy.unpackb(self._ws.recv(timeout=self.timeout))
        except TimeoutError:
            self._drop()
            raise
        except WebSocketException as e:
            self._drop()
            raise ConnectionError(f"connection to the policy server at {self.url} failed: {e}") from e
        if isinstance(reply, dict) and "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise PolicyServerError(str(err.get("type", "error")), str(err.get("message", reply["error"])))
        self.last_timing = {**(reply.get("server_timing") or {}), "roundtrip_ms": (time.perf_counter() - t0) * 1e3}
        return reply

    def reset(self, instruction: str | None = None) -> None:
        self._settle()  # a chunk for the previous episode must not land in the new one
        self._call({"type": "reset", "instruction": instruction})
        self.instruction = instruction  # also sent with each observation, so a reconnect keeps the task
        self.chunker.reset()
        self.last_action = None
        self.last_safety: dict = {"hold": False, "clipped": False, "delta_limited": False}
        self._chunk_safety: dict = {}
        self._counts = dict.fromkeys(COUNT_KEYS, 0)

    def infer(self, obs: dict) -> dict:
        """One round trip: {"actions": float32 [H, A], "server_timing": {...}, "safety": {...}}."""
        if obs.get("instruction") is None and self.instruction is not None:
            obs = {**obs, "instruction": self.instruction}
        reply = self._call({"type": "infer", "obs": obs})
        reply["actions"] = np.asarray(reply["actions"], dtype=np.float32)
        reply["server_timing"] = dict(self.last_timing)  # adds the client-side roundtrip_ms
        add_counts(self._counts, "chunk", reply.get("safety") or {})
        return reply

    def act(self, obs: dict) -> np.ndarray:
        if self.refill_below is None:
            if self.chunker.needs_chunk():
                self._push(self.infer(obs))
        else:
            self._act_async(obs)
        a = self.chunker.pop()
        step = {"hold": False, "clipped": False, "delta_limited": False}
        if self.safety is not None:
            a, step = self.safety.step(a, self.last_action)
        # the server's flags for the chunk this step came from (evaluate counts held/clipped steps)
        self.last_safety = {k: bool(v or k in ("hold", "clipped") and self._chunk_safety.get(k)) for k, v in step.items()}
        add_counts(self._counts, "step", step if self.safety is not None else {})
        self.last_action = a
        return a

    def _act_async(self, obs: dict) -> None:
        """Queue the reply that has arrived; request the next chunk early; wait only when dry."""
        if self._pending is not None and self._pending[0].done():
            self._take_pending()
        if self._pending is None and self._queue_low():
            # a private copy: robot code may refill its camera buffer before the request is packed
            frozen = {k: _copy(v) for k, v in obs.items()}
            self._pending = (self._worker.submit(self.infer, frozen), self.chunker.t)
        if self.chunker.queued == 0:  # nothing left to execute: wait for the chunk in flight
            if self.chunker.t > 0:
                self.starved_steps += 1
            # It was sent while at most refill_below x H actions were queued, so it still covers this step.
            self._take_pending()

    def _queue_low(self) -> bool:
        return self.chunker.queued <= self.refill_below * self.chunker.horizon

    def _take_pending(self) -> None:
        future, start = self._pending
        self._pending = None
        # raises what the request raised (timeout, server error)
        self._push(future.result(), start=start)

    def _push(self, reply: dict, start: int | None = None) -> None:
        self.chunker.push(reply["actions"], start=start)
        flags = reply.get("safety")
        self._chunk_safety = dict(flags) if isinstance(flags, dict) else {}

    def _settle(self) -> None:
        if self._pending is not None:
            future, _ = self._pending
            self._pending = None
            try:
                future.result()
            except Exception:
                pass  # a failed request of the episode being abandoned

    def close(self) -> None:
        self._settle()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        if self._ws is not None:
            self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
