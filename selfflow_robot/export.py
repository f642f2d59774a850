"""`python -m selfflow_robot.export VERB RUN [key=value ...]`: a policy checkpoint for other runtimes.

onnx     the fixed-step action sampler as ONNX + manifest.json + normalization.json, for controllers
         without Python or torch (selfflow_robot.export_onnx; run it with policies/onnx_runner.py
         or onnxruntime's C++ API, docs/serving.md).
RUN is a run directory, its checkpoints/ folder or a checkpoint directory (as `serve policy=`).
Each verb's module has `cli(args: list[str])`; `--help` after the verb lists its keys.
"""
from __future__ import annotations

import importlib
import sys

from selfflow_robot import cli

# verb: (module with cli(args), one line for the usage text)
VERBS = {
    "onnx": ("selfflow_robot.export_onnx", "ONNX sampler + manifest for C++ / numpy controllers"),
    "lerobot": ("selfflow_robot.export_lerobot", "a checkpoint LeRobot loads with --policy.path=DIR"),
}


def usage() -> str:
    lines = ["usage: python -m selfflow_robot.export {" + "|".join(VERBS) + "} RUN [key=value ...]", ""]
    lines += [f"  {verb:<8} {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def parse(args: list[str], keys: dict) -> tuple[str, dict]:
    """RUN and key=value options (values as strings) checked against `keys`; ValueError otherwise."""
    run, opts = None, {}
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            if run is not None:
                raise ValueError(f"more than one RUN given ({run!r}, {a!r}); options are key=value")
            run = a
        elif key not in keys:
            raise ValueError(f"unknown key {key!r}; known keys: {', '.join(keys)}")
        else:
            opts[key] = value
    if run is None:
        raise ValueError("no RUN given: pass a run directory or checkpoint directory")
    return run, opts


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        raise SystemExit(f"error: unknown export {verb!r}; expected one of: {', '.join(VERBS)}")
    module = importlib.import_module(VERBS[verb][0])
    with cli.reported_errors(interrupted="export interrupted; nothing is kept"):
        module.cli(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
