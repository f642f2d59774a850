"""`python -m selfflow_robot.export VERB RUN key=value ...`: a trained policy in another runtime's format.

  lerobot   a checkpoint LeRobot loads with --policy.path=DIR (selfflow_robot.export_lerobot)
"""
from __future__ import annotations

import sys

VERBS = {"lerobot": "selfflow_robot.export_lerobot"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in VERBS:
        raise SystemExit(f"usage: python -m selfflow_robot.export {{{'|'.join(VERBS)}}} RUN key=value ..."
                         + (f"\nerror: unknown export '{argv[0]}'" if argv and argv[0] not in ("-h", "--help") else ""))
    import importlib

    importlib.import_module(VERBS[argv[0]]).cli(argv[1:])


if __name__ == "__main__":
    main()
