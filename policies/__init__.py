"""Policy runtime and serving: `Policy`, chunking/ensembling, safety, websocket server and client.

Nothing here imports torch at import time: `Policy` is loaded lazily, so
`from selfflow_robot.policies.client import WebsocketClientPolicy` stays torch-free.
"""
from __future__ import annotations

from .chunking import ActionChunker, ChunkConfig
from .safety import SafetyConfig, SafetyFilter

__all__ = ["Policy", "ChunkConfig", "SafetyConfig", "ActionChunker", "SafetyFilter", "WebsocketClientPolicy"]


def __getattr__(name):  # PEP 562 lazy attributes
    if name == "Policy":
        from .policy import Policy
        return Policy
    if name == "WebsocketClientPolicy":
        from .client import WebsocketClientPolicy
        return WebsocketClientPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
