"""Evaluation harness: parallel rollouts, per-episode records with resume, summaries, videos, plots.

`evaluate(cfg_dict) -> summary` runs an evaluation from a resolved config (see configs/evaluate.yaml);
`selfflow_robot.evaluate.evaluate(...)` builds that config from overrides.
"""
from .records import load_records
from .runner import evaluate
from .summary import summarize, to_markdown

__all__ = ["evaluate", "load_records", "summarize", "to_markdown"]
