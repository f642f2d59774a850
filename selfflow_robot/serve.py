"""Serve a policy checkpoint over websocket: `python -m selfflow_robot.serve policy=PATH port=8000`.

See docs/serving.md for the protocol and selfflow_robot.policies.client for the robot side.
"""
from __future__ import annotations

import errno
import logging
import socket

from omegaconf import DictConfig

from selfflow_robot.cli import run, to_container


def build_policy(cfg: dict):
    from selfflow_robot.policies import ChunkConfig, Policy, SafetyConfig

    return Policy.load(cfg["policy"], device=cfg.get("device", "cpu"), sampler_steps=int(cfg.get("sampler_steps", 10)),
                       mode=cfg.get("mode", "action_first"), chunk=ChunkConfig(**(cfg.get("chunk") or {})),
                       safety=SafetyConfig(**(cfg.get("safety") or {})), dtype=str(cfg.get("dtype", "auto")),
                       compile=bool(cfg.get("compile", False)), text_encoder=cfg.get("text_encoder"))


def warmup(policy, n: int) -> None:
    obs = policy.example_observation()  # with state / instruction embedding when the policy takes them
    for _ in range(int(n)):
        policy.infer(obs)
    policy.reset()


def check_port_free(host: str, port: int) -> None:
    """Before the model loads (minutes on a GPU): a port in use is one clear line, not a bind error after."""
    if not port:
        return
    if not 0 < port < 65536:
        raise ValueError(f"port={port}: must be in 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the server itself binds: a port left in TIME_WAIT by a just-stopped server is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use (another server?); pass port=...") from None
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def main(cfg: DictConfig | dict):
    from selfflow_robot.policies.server import PolicyServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # not a line per health check and connection
    c = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    c = {k: v for k, v in c.items() if k != "hydra"}
    if c.get("policy") in (None, "", "???"):
        raise ValueError("policy is not set: pass policy=RUN_DIR or a checkpoint folder")
    if c.get("host") not in ("127.0.0.1", "localhost", "::1") and not c.get("api_key"):
        logging.warning("serving on %s without an api_key: anyone on the network can drive the robot", c.get("host"))
    check_port_free(c.get("host", "127.0.0.1"), int(c.get("port", 8000)))
    policy = build_policy(c)
    m = policy.metadata
    logging.info("policy %s (model %s, %s on %s); clients %s", m.get("checkpoint") or c["policy"], m.get("model"),
                 m.get("dtype"), c.get("device", "cpu"), "need the api_key" if c.get("api_key") else "need no key")
    # compiled: the first calls compile and record the CUDA graphs; keep them off the robot's clock
    warmup(policy, max(int(c.get("warmup", 1)), 3 if c.get("compile") else 0))
    server = PolicyServer(policy, host=c.get("host", "127.0.0.1"), port=int(c.get("port", 8000)),
                          api_key=c.get("api_key"), max_message_bytes=int(float(c.get("max_message_mb", 16)) * 2**20),
                          return_extras=bool(c.get("return_extras", False)), openpi_keys=c.get("openpi_keys"),
                          idle_timeout_s=c.get("idle_timeout_s", 300), max_connections=int(c.get("max_connections", 32)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def cli() -> None:
    run("serve", main)


if __name__ == "__main__":
    cli()
