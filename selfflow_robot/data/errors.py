"""Bad-data policy shared by every reader and writer: name the file, episode and field."""
from __future__ import annotations

import os
import sys

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A record, episode or feature that cannot be used. The message names where it is."""

    def __init__(self, problem: str, *, file: str | None = None, episode: str | int | None = None,
                 field: str | None = None):
        self.problem, self.file, self.episode, self.field = problem, file, episode, field
        where = []
        if file is not None:
            where.append(f"file {file}")
        if episode is not None:
            where.append(f"episode {episode}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


def check_data_dir(path, dataset: str, what: str) -> str:
    """The expanded folder a dataset reads (its data_dir), or an error saying that it is unset,
    missing or not a folder; `what` says what it should hold."""
    if not path:
        raise ValueError(f"{dataset}: data_dir is not set: point it at {what} (data_dir=PATH or dataset.path=PATH)")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{dataset}: data_dir '{path}' does not exist (expected {what})")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{dataset}: data_dir '{path}' is not a folder (expected {what})")
    return path


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


class SkipLog:
    """Collects skipped items under on_error=skip so that nothing is dropped silently."""

    def __init__(self, on_error: str = "raise"):
        self.on_error = check_on_error(on_error)
        self.items: list[str] = []

    def handle(self, err: DataError) -> None:
        """Raise under on_error=raise; otherwise remember (and warn about) the skipped item."""
        if self.on_error == "raise":
            raise err
        self.items.append(str(err))
        print(f"[selfflow_robot.data] skipped: {err}", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.items)

    def report(self, what: str = "episodes") -> str:
        return f"skipped {len(self.items)} {what} with bad data" + (
            "" if not self.items else ":\n  " + "\n  ".join(self.items[:20]) +
            (f"\n  ... and {len(self.items) - 20} more" if len(self.items) > 20 else ""))
