"""Orchestration: episode list -> shard -> skip finished -> run (workers) -> records -> summary."""
from __future__ import annotations

import difflib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
import traceback

from ..fileio import write_json_atomic
from .episodes import build_episodes, dist_info, shard
from .policy_factory import check_policy_env, policy_identity, policy_load_kwargs, uses_policy_kwargs
from .records import RecordWriter, done_marker, load_records, rank_file
from .summary import safety_warning, summarize, to_markdown, write_summary
from .training_env import match_training_env
from .worker import EpisodeRunner, worker_main

_DEFAULT_SUCCESS = {"metaworld": "early_stop", "simpler": "final_step"}
# Settings that change results: resuming into a directory made with others would mix runs.
# "checkpoint": the resolved checkpoint (or the policy spec), see policy_identity.
# "policy_kwargs": the Policy.load options a checkpoint runs with (sampler steps, chunking, safety),
# nulls dropped; {} for policies that ignore them. Left out on purpose: `device` (cpu vs cuda can
# shift sampled actions slightly, but a run moved to another device should resume), workers and
# threads (scheduling only), videos and progress.
_FINGERPRINT_KEYS = ("checkpoint", "env", "max_episode_steps", "seed", "policy_kwargs")
# Keys added after run.json files were first written, with the value an older file implies.
_FINGERPRINT_DEFAULTS = {"policy_kwargs": {}}
VIDEO_FORMATS = ("mp4", "gif")


def _fingerprint(cfg: dict, policy_kwargs: dict | None = None) -> dict:
    fp = {k: cfg.get(k) for k in _FINGERPRINT_KEYS}
    fp["policy_kwargs"] = dict(policy_kwargs or {})
    return json.loads(json.dumps(fp, default=str))


def default_out_dir(cfg: dict, policy_kwargs: dict | None = None) -> str:
    """out_dir=null: outputs/eval/<env>/<policy>-<hash of the settings that change results>, so
    each policy and setting (tasks, seeds, limits, Policy.load options) gets its own folder that
    the same command resumes, and a run with other tasks never meets another's records."""
    import hashlib
    import re
    from pathlib import PurePath

    fp = _fingerprint(cfg, policy_kwargs)
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:8]
    policy = str(cfg["checkpoint"])
    parts = PurePath(policy).parts if "://" not in policy else (policy,)
    if len(parts) >= 3 and parts[-2] == "checkpoints":  # RUN/checkpoints/step_N -> RUN-step_N
        parts = (parts[-3], parts[-1])
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", "-".join(parts[-2:])).strip("-.") or "policy"
    return os.path.join("outputs", "eval", str(cfg["env"]["name"]), f"{name[-60:]}-{digest}")


def _check_run_file(cfg: dict, rank: int, policy_kwargs: dict | None = None) -> None:
    path = os.path.join(cfg["out_dir"], "run.json")
    fp = _fingerprint(cfg, policy_kwargs)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old = {**_FINGERPRINT_DEFAULTS, **old}  # a run.json from before a key existed: its default
        if old != fp and cfg.get("resume", True):
            differ = ", ".join(k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k))
            raise ValueError(f"{cfg['out_dir']} holds results of a different run ({path}; differs in: {differ}); "
                             f"use another out_dir or resume=false to start over.\n old: {old}\n new: {fp}")
    if rank == 0:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        write_json_atomic(path, fp, indent=2)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def _run_inline(cfg, todo, on_record, on_error, policy=None):
    runner = EpisodeRunner(cfg, policy)
    try:
        for ep in todo:
            try:
                on_record(runner.run(ep))
            except Exception as e:  # keep going; the episode stays unrecorded and is retried on resume
                on_error(ep["key"], "".join(traceback.format_exception(e)))
    finally:
        runner.close()


def say_once(kind: str, message, said: set) -> None:
    """A worker's log line ("log": (logger, level, text)) or formatted warning ("warning": text),
    unless another worker said the same: each loads the same policy and warns alike."""
    if (kind, message) in said:
        return
    said.add((kind, message))
    if kind == "log":
        logging.getLogger(message[0]).log(message[1], message[2])
    else:
        sys.stderr.write(message)


def _run_workers(cfg, todo, n_workers, on_record, on_error):
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    for ep in todo:
        jobs.put(ep)
    procs = [ctx.Process(target=worker_main, args=(cfg, jobs, results), daemon=True) for _ in range(n_workers)]
    for p in procs:
        jobs.put(None)
        p.start()
    alive, fatal, said = n_workers, None, set()
    try:
        while alive:
            try:
                kind, a, b = results.get(timeout=5)
            except Exception:  # queue.Empty: check for workers that died without reporting
                if not any(p.is_alive() for p in procs) and results.empty():
                    raise RuntimeError("all evaluation workers died; see their stderr above")
                continue
            if kind in ("log", "warning"):
                say_once(kind, a, said)
            elif kind == "record":
                on_record(a)
            elif kind == "error":
                on_error(a, b)
            elif kind == "fatal":  # a worker that could not start; it sends no "exit"
                fatal = (a, b)
                alive -= 1
            elif kind == "exit":
                alive -= 1
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        # Episodes no worker took may still sit in the pipe: without this the interpreter's exit
        # waits forever for the queue's feeder thread to hand them over.
        jobs.cancel_join_thread()
    if fatal:
        (bad_input, message), tb = fatal
        if bad_input:  # e.g. an unreadable checkpoint
            raise ValueError(f"an evaluation worker could not start: {message}")
        raise RuntimeError(f"an evaluation worker could not start:\n{tb}")


def check_video_format(fmt) -> str:
    value = str(fmt).lower().lstrip(".")
    if value not in VIDEO_FORMATS:
        close = difflib.get_close_matches(value, VIDEO_FORMATS, n=1, cutoff=0.3)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"video_format={fmt}: not a video format this writer makes{hint}; "
                         f"expected one of {', '.join(VIDEO_FORMATS)}")
    return value


def _preflight(cfg: dict) -> None:
    """Fail in the parent, once, on what would otherwise fail in every worker (before run.json)."""
    check_policy_env(cfg["policy"], cfg)
    cfg["video_format"] = check_video_format(cfg.get("video_format") or "mp4")
    env_cfg = cfg["env"]
    if env_cfg["name"] == "simpler":
        from selfflow_robot.envs.simpler import load_backend
        load_backend(env_cfg.get("backend") or "mani_skill2_real2sim")  # ImportError says how to install


def evaluate(cfg: dict) -> dict:
    """Run (or resume) the evaluation described by the resolved config; return the summary.
    `cfg["policy"]` may also be a policy object (reset/act), run in this process (workers=0)."""
    policy_obj = None if isinstance(cfg.get("policy"), str) else cfg.get("policy")
    if policy_obj is not None:
        cfg = dict(cfg, policy=getattr(policy_obj, "name", type(policy_obj).__name__))
    cfg = match_training_env(json.loads(json.dumps(cfg, default=str)))
    env_cfg = cfg["env"]
    env_cfg.setdefault("success_mode", _DEFAULT_SUCCESS.get(env_cfg["name"], "final_step"))
    rank, world = dist_info()
    _preflight(cfg)
    # Before run.json is written: a missing checkpoint fails here, once, not in every worker.
    cfg["checkpoint"] = cfg["policy"] if policy_obj is not None else policy_identity(cfg["policy"])
    # Unknown tasks and bad episode counts fail here too, before run.json is written.
    episodes = build_episodes(cfg)
    # nulls dropped; Policy.load reads them only for a checkpoint (make_policy drops the nulls itself)
    given = policy_load_kwargs(cfg)
    policy_kwargs = given if policy_obj is None and uses_policy_kwargs(cfg["policy"]) else {}
    if given and not policy_kwargs:
        logging.getLogger("selfflow_robot").warning("policy_kwargs %s are ignored: only policy=PATH (Policy.load) "
                                                    "reads them", given)
    out_dir = cfg["out_dir"] = os.path.abspath(cfg.get("out_dir") or default_out_dir(cfg, policy_kwargs))
    _check_run_file(cfg, rank, policy_kwargs)
    if not cfg.get("resume", True):
        for p in (rank_file(out_dir, rank), done_marker(out_dir, rank)):
            if os.path.exists(p):
                os.remove(p)
    done = {r["key"] for r in load_records(out_dir)}
    mine = shard(episodes, rank, world)
    todo = [e for e in mine if e["key"] not in done]
    writer = RecordWriter(out_dir, rank)
    errors_path = os.path.join(out_dir, f"errors.rank{rank:03d}.jsonl")
    stats = {"ok": 0, "success": 0, "errors": 0}
    bar = _progress(len(mine), len(mine) - len(todo), bool(cfg.get("progress", True)) and rank == 0,
                    f"{env_cfg['name']}/{cfg['policy']}")

    def on_record(rec):
        writer.write(rec)
        stats["ok"] += 1
        stats["success"] += bool(rec["success"])
        bar.update(1)
        bar.set_postfix_str(f"success {stats['success']}/{stats['ok']} ({100 * stats['success'] / stats['ok']:.0f}%)")

    failures: set[str] = set()

    def on_error(key, tb):
        stats["errors"] += 1
        with open(errors_path, "a") as f:
            f.write(json.dumps({"key": key, "traceback": tb}) + "\n")
        line = tb.strip().splitlines()[-1]
        bar.write(f"episode {key} failed (retried on resume)" + (": the same error" if line in failures else f":\n{line}"))
        failures.add(line)

    t0 = time.perf_counter()
    n_workers = 0 if policy_obj is not None else min(int(cfg.get("workers", 0)), len(todo))
    try:
        if todo and n_workers > 0:
            _run_workers(cfg, todo, n_workers, on_record, on_error)
        elif todo:
            _run_inline(cfg, todo, on_record, on_error, policy_obj)
    finally:
        writer.close()
        bar.close()
    wall = time.perf_counter() - t0
    if stats["errors"] == 0:
        open(done_marker(out_dir, rank), "w").close()
    if rank == 0 and world > 1:  # merge: wait for the other ranks' markers
        deadline = time.time() + float(cfg.get("merge_wait_s", 3600))
        while time.time() < deadline and not all(os.path.exists(done_marker(out_dir, r)) for r in range(world)):
            time.sleep(2)
    keys = {e["key"] for e in episodes}
    records = [r for r in load_records(out_dir) if r["key"] in keys]
    throughput = {"episodes_run": stats["ok"], "wall_s": round(wall, 2), "workers": max(n_workers, 1),
                  "episodes_per_min": round(60 * stats["ok"] / wall, 2) if stats["ok"] and wall > 0 else None,
                  "errors": stats["errors"], "rank": rank, "world_size": world}
    summary = summarize(records, cfg, len(episodes), throughput)
    if rank == 0:
        summary["files"] = write_summary(summary, out_dir)
        if cfg.get("progress", True):
            print(to_markdown(summary))
        if safety_warning(summary):  # also with progress=false: a 0% that is no verdict on the policy
            logging.getLogger("selfflow_robot").warning(safety_warning(summary))
    return summary
