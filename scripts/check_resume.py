"""Did a stopped-and-resumed training run continue where it stopped? (gpu_bench.sh dist stage)

    python scripts/check_resume.py RUN_DIR --steps 20 40 --parallel ddp

RUN_DIR was trained to the first step count, then started again with resume=true to the second.
Prints one JSON line: the last checkpoint's step, parallel mode and world size, the logged steps,
and `ok` (exit status 1 when not): the checkpoint is at the final step and says the requested
parallel mode, and the metrics log has every step once, in order (a restart from step 0 repeats
steps; a lost checkpoint leaves a gap).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def check(run_dir: Path, first: int, final: int, parallel: str) -> dict:
    out: dict = {"run": str(run_dir), "parallel_requested": parallel, "steps": [first, final]}
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return {**out, "ok": False, "why": f"no {latest}"}
    state = json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "trainer_state" / "state.json")
                       .read_text())
    out.update(step=state["step"], parallel=state["parallel"], world_size=state["world_size"])
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if line.strip() and "loss" in json.loads(line)]
    out["logged_steps"] = [logged[0], logged[-1], len(logged)] if logged else []
    why = []
    if state["step"] != final:
        why.append(f"last checkpoint at step {state['step']}, expected {final}")
    if state["parallel"] != parallel:
        why.append(f"checkpoint says parallel={state['parallel']}")
    if logged != sorted(set(logged)):
        why.append("the metrics log repeats or reorders steps (a restart instead of a resume?)")
    if not logged or logged[-1] != final or not any(s <= first for s in logged) or not any(s > first for s in logged):
        why.append(f"the metrics log does not cover both runs up to step {final}")
    return {**out, "ok": not why, "why": "; ".join(why)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, nargs=2, required=True, metavar=("FIRST", "FINAL"))
    ap.add_argument("--parallel", required=True)
    a = ap.parse_args(argv)
    result = check(a.run_dir, *a.steps, a.parallel)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
