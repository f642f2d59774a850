"""Websocket policy server (openpi style): msgpack-numpy frames, metadata on connect, /healthz.

Protocol (every frame is one msgpack map; arrays as raw bytes, see msgpack_numpy):
  server -> client on connect: metadata dict (+ "protocol", "max_message_bytes")
  {"type": "infer", "obs": {"image": uint8[H,W,3], "instruction": str, "state": float[S]}}
      -> {"actions": float32[H,A], "safety": {...},
          "server_timing": {"infer_ms", "postprocess_ms", "total_ms", "prev_total_ms"}}
  {"type": "reset", "instruction": str | None} -> {"ok": True}
  anything wrong -> {"error": {"type": ..., "message": ...}}; the connection stays open.
openpi-client compatibility: a map without "type" is an observation itself (openpi's protocol),
with openpi's key names mapped by `openpi_keys` (our field -> their key: "image" <- "observation/image",
"state" <- "observation/state", "instruction" <- "prompt"; extra cameras as "images.<view>"); its reply is the infer reply, and an
error comes back as a text frame, which openpi-client raises as RuntimeError.
Messages above `max_message_bytes` get a "too_large" error; above twice that, websockets
itself closes that one connection (1009) so a client cannot make the server buffer without
bound. Inference runs in one worker thread (one model call at a time) so the event loop
keeps answering pings, /healthz and other connections. API key: `Authorization: Api-Key <k>`
or `x-api-key: <k>`, else HTTP 401 (a repeated key header: HTTP 400). Compression is off (images do not
compress; no zip bombs). A connection that sends no request for `idle_timeout_s` is closed (1001), and
beyond `max_connections` open connections a new one is answered HTTP 503, so idle sockets cannot use up
the process's file descriptors; both are logged in one line.
"""
from __future__ import annotations

import asyncio
import hmac
import http
import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from . import msgpack_numpy
from .policy import ObservationError

PROTOCOL = "selfflow-robot/1"
log = logging.getLogger("selfflow_robot.serve")


OPENPI_KEYS = {"image": "observation/image", "state": "observation/state", "instruction": "prompt"}  # ours: theirs
_KEEP = object()  # a reply that leaves the connection's instruction as it is
OBS_FIELDS = ("image", "images", "state", "instruction", "instruction_embedding")


def _error(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message[:2000]}}


def _decode_problem(e: Exception) -> str:
    """msgpack's errors in words: several carry no message at all (StackError, FormatError)."""
    import msgpack

    if isinstance(e, msgpack.StackError):
        return ("StackError: lists/maps nested deeper than msgpack's limit (1024 levels); "
                "send a flat observation dict of arrays")
    if isinstance(e, msgpack.FormatError):
        return "FormatError: not msgpack data (a byte no msgpack message starts with)"
    if isinstance(e, msgpack.ExtraData):
        return "ExtraData: more bytes after one complete message; send one message per frame"
    return f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (a malformed message)"


def _count(counts: dict, flags: dict) -> None:
    """Add one reply's safety flags to a connection's counts (chunks held / clipped / delta-limited)."""
    counts["chunks"] += 1
    for flag, key in (("hold", "held_chunks"), ("clipped", "clipped_chunks"), ("delta_limited", "delta_limited_chunks")):
        counts[key] += bool(flags.get(flag))


def _flat(keys: dict, prefix: str = "") -> list[tuple[str, str]]:
    """{"images": {"wrist": "observation/wrist_image"}} -> [("images.wrist", "observation/wrist_image")]."""
    out = []
    for k, v in keys.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", str(v))]
    return out


@dataclass
class _Reply:
    body: dict
    instruction: object = _KEEP  # reset: the connection's new instruction
    openpi: bool = False  # an openpi-client request: errors go back as text frames


class PolicyServer:
    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_message_bytes: int = 16 * 2**20, return_extras: bool = False, metadata: dict | None = None,
                 openpi_keys: dict | None = None, idle_timeout_s: float | None = 300.0, max_connections: int = 32):
        self.policy = policy
        if idle_timeout_s is not None and not float(idle_timeout_s) > 0:
            raise ValueError(f"idle_timeout_s must be > 0 seconds or null (never), got {idle_timeout_s!r}")
        if isinstance(max_connections, bool) or int(max_connections) < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {max_connections!r}")
        self.idle_timeout_s = None if idle_timeout_s is None else float(idle_timeout_s)
        self.max_connections = int(max_connections)
        self.connections = 0  # open websocket connections (handlers running)
        self.host, self.port = host, int(port)
        self.api_key = api_key or None
        self.max_message_bytes = int(max_message_bytes)
        self.return_extras = return_extras
        # their key -> our field ("images.wrist" for an extra camera), for renaming openpi-client observations
        self.from_openpi = {theirs: ours for ours, theirs in _flat(OPENPI_KEYS if openpi_keys is None else openpi_keys)}
        self.metadata = {**(metadata if metadata is not None else policy.metadata),
                         "protocol": PROTOCOL, "max_message_bytes": self.max_message_bytes}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-infer")
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()

    # ---- HTTP side: health check and authentication during the opening handshake ----
    def _auth_error(self, headers) -> tuple[http.HTTPStatus, str] | None:
        if self.api_key is None:
            return None
        # get_all, not get: get() raises on a repeated header (it was an HTTP 500 and a traceback per request)
        auth, key = headers.get_all("Authorization"), headers.get_all("x-api-key")
        if len(auth) > 1 or len(key) > 1:
            return http.HTTPStatus.BAD_REQUEST, "repeated Authorization or x-api-key header\n"
        auth = auth[0] if auth else ""
        given = auth[len("Api-Key "):].strip() if auth.startswith("Api-Key ") else (key[0] if key else "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return http.HTTPStatus.UNAUTHORIZED, "missing or invalid API key\n"
        return None

    def _process_request(self, connection: ServerConnection, request):
        if request.path.split("?")[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        refused = self._auth_error(request.headers)
        if refused is not None:
            return connection.respond(*refused)
        if self.connections >= self.max_connections:
            log.warning("refused a connection from %s: %d connections are open (max_connections=%d)",
                        connection.remote_address, self.connections, self.max_connections)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many open connections\n")
        return None

    # ---- websocket side ----
    async def _handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        packer = msgpack_numpy.Packer()
        instruction: str | None = None  # per connection, so clients do not overwrite each other's task
        prev_total_ms = None
        counts = {"chunks": 0, "held_chunks": 0, "clipped_chunks": 0, "delta_limited_chunks": 0}  # this connection's
        self.connections += 1
        try:
            await ws.send(packer.pack(self.metadata))
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), self.idle_timeout_s)
                except asyncio.TimeoutError:
                    log.info("closing the connection from %s: no request for %g s (idle_timeout_s)",
                             ws.remote_address, self.idle_timeout_s)
                    await ws.close(1001, f"idle for {self.idle_timeout_s:g} s")
                    return
                t0 = time.perf_counter()
                r = await self._reply(message, loop, instruction)
                reply = r.body
                if r.instruction is not _KEEP:  # a reset: a new episode
                    instruction = r.instruction
                    counts = dict.fromkeys(counts, 0)
                if r.openpi and "error" in reply:
                    await ws.send(f"{reply['error']['type']}: {reply['error']['message']}")
                    continue
                if isinstance(reply.get("safety"), dict):
                    _count(counts, reply["safety"])
                    reply["safety"]["counts"] = dict(counts)
                if "server_timing" in reply:
                    reply["server_timing"]["total_ms"] = (time.perf_counter() - t0) * 1e3
                    if prev_total_ms is not None:
                        reply["server_timing"]["prev_total_ms"] = prev_total_ms
                try:
                    data = packer.pack(reply)
                except Exception as e:  # a predictor returned something unserialisable
                    data = packer.pack(_error("internal", f"cannot encode reply: {e}"))
                await ws.send(data)
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except ConnectionClosedOK:  # the client said goodbye
            pass
        except ConnectionClosed as e:  # a robot process that exits without close(): routine, not a traceback
            log.info("client %s disconnected (%s)", ws.remote_address, e)
        finally:
            self.connections -= 1

    async def _reply(self, message, loop, instruction) -> _Reply:
        if isinstance(message, str):
            return _Reply(_error("bad_request", "expected a binary msgpack frame, got text"))
        if len(message) > self.max_message_bytes:
            return _Reply(_error("too_large", f"message of {len(message)} bytes exceeds max_message_bytes="
                                 f"{self.max_message_bytes}"))
        try:
            req = msgpack_numpy.unpackb(message)
        except Exception as e:  # msgpack raises assorted errors on garbage; never let them kill the loop
            return _Reply(_error("bad_request", f"cannot decode msgpack message: {_decode_problem(e)}"))
        if isinstance(req, dict) and "type" not in req:  # openpi-client: the observation itself
            if not all(isinstance(k, str) for k in req):
                return _Reply(_error("bad_request", "observation keys must be strings"), openpi=True)
            obs: dict = {}
            for k, v in req.items():
                ours = self.from_openpi.get(k, k)
                if ours.startswith("images."):  # an extra camera view of a multi-camera policy
                    obs.setdefault("images", {})[ours[len("images."):]] = v
                else:
                    obs[ours] = v
            reply = await self._infer(obs, loop, instruction)
            if reply.get("error", {}).get("type") == "invalid_observation":  # in the openpi user's terms
                unmapped = sorted(k for k in req if k not in self.from_openpi and k not in OBS_FIELDS)
                reply["error"]["message"] += (
                    f" [openpi keys -> policy inputs: {self.from_openpi}; keys in this request that map to nothing: "
                    f"{unmapped}; serve with openpi_keys.<input>=<key>, e.g. +openpi_keys.images.wrist=<key>]")
            return _Reply(reply, openpi=True)
        if not isinstance(req, dict) or not isinstance(req.get("type"), str):
            return _Reply(_error("bad_request", "a request must be a map with a string 'type'"))
        kind = req["type"]
        if kind == "infer":
            obs = req.get("obs")
            if not isinstance(obs, dict):
                return _Reply(_error("bad_request", "'infer' needs an 'obs' map"))
            return _Reply(await self._infer(obs, loop, instruction))
        if kind == "reset":
            instr = req.get("instruction")
            if instr is not None and not isinstance(instr, str):
                return _Reply(_error("bad_request", "'reset' instruction must be a string or nil"))
            try:  # the instruction stays with this connection; the policy itself keeps none (shared by all)
                await loop.run_in_executor(self._executor, self.policy.reset, None)
            except Exception as e:
                return _Reply(_error("reset_error", f"{type(e).__name__}: {e}"))
            return _Reply({"ok": True}, instruction=instr)
        return _Reply(_error("unknown_type", f"unknown request type {kind!r}; expected 'infer' or 'reset'"))

    async def _infer(self, obs: dict, loop, instruction) -> dict:
        if obs.get("instruction") is None:  # never the policy's own: another connection may have set it
            obs = {**obs, "instruction": instruction or ""}
        try:
            result = await loop.run_in_executor(self._executor, self.policy.infer, obs)
        except ObservationError as e:
            return _error("invalid_observation", str(e))
        except Exception as e:
            log.error("inference failed:\n%s", traceback.format_exc())
            return _error("inference_error", f"{type(e).__name__}: {e}")
        if not self.return_extras:
            result = {k: result[k] for k in ("actions", "server_timing", "safety") if k in result}
        return dict(result, server_timing=dict(result.get("server_timing", {})))

    # ---- lifecycle ----
    async def serve_async(self, stop: asyncio.Future | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = stop if stop is not None else self._loop.create_future()
        async with serve(self._handler, self.host, self.port, process_request=self._process_request,
                         compression=None, max_size=2 * self.max_message_bytes, ping_interval=20,
                         ping_timeout=60, close_timeout=2, server_header=None) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]  # resolves port=0 to the ephemeral port
            self.ready.set()
            log.info("serving policy on ws://%s:%d (healthz: http://%s:%d/healthz)",
                     self.host, self.port, self.host, self.port)
            await self._stop

    def serve_forever(self) -> None:
        asyncio.run(self.serve_async())

    def start_in_thread(self, timeout: float = 10.0) -> int:
        """Run the server on a daemon thread (tests, benchmarks); returns the bound port."""
        self._thread = threading.Thread(target=self.serve_forever, name="policy-server", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError("policy server did not start")
        return self.port

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        if getattr(self, "_thread", None) is not None:
            self._thread.join(timeout=10)
        self._executor.shutdown(wait=False)

