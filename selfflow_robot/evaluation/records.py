"""Per-episode records: one JSONL file per rank, appended and flushed per episode, so an
interrupted run resumes without repeating (or losing) finished episodes."""
from __future__ import annotations

import glob
import json
import os


def records_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "records")


def rank_file(out_dir: str, rank: int) -> str:
    return os.path.join(records_dir(out_dir), f"rank{rank:03d}.jsonl")


def done_marker(out_dir: str, rank: int) -> str:
    return os.path.join(records_dir(out_dir), f"rank{rank:03d}.done")


def load_records(out_dir: str) -> list[dict]:
    """All complete records of every rank; a torn last line (killed mid-write) is ignored.
    Duplicates (same key) keep the first."""
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(records_dir(out_dir), "rank*.jsonl"))):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("key") not in seen:
                    seen.add(rec.get("key"))
                    out.append(rec)
    return out


class RecordWriter:
    def __init__(self, out_dir: str, rank: int):
        os.makedirs(records_dir(out_dir), exist_ok=True)
        path = rank_file(out_dir, rank)
        self._truncate_torn_tail(path)
        self._f = open(path, "a")

    @staticmethod
    def _truncate_torn_tail(path: str) -> None:
        if not os.path.exists(path):
            return
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
