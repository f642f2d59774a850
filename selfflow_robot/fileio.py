"""Atomic JSON writes (standard library only, so torch-free paths such as evaluation can use it)."""
from __future__ import annotations

import json
import os


def write_json_atomic(path, obj, **dump_kwargs) -> None:
    """Write to a temporary file, fsync, then rename over `path`: readers never see half a file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_kwargs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
