"""Pre/post-processors with selfflow-robot's normalisation (selfflow_robot.lerobot_format).

LeRobot's QUANTILES step maps q01/q99 to [-1, 1] without clipping, divides by eps where
q99 == q01 and normalises every dimension; ours clips, maps such dimensions to 0 and passes
masked dimensions (the gripper) through, exactly as the policy was trained; after un-normalising it
bounds every action dim to the training data's range, as Policy.load's safety.data_margin does
(the bounds come from selfflow_robot.policies.safety, via lerobot_format.action_bounds). The statistics sit in
the step's JSON config (a few numbers per dimension), so no state file is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lerobot.configs.types import PipelineFeatureType, PolicyFeature
from lerobot.lerobot_types import EnvTransition, TransitionKey
from lerobot.processor import (AddBatchDimensionProcessorStep, DeviceProcessorStep, PolicyAction,
                               PolicyProcessorPipeline, ProcessorStep, ProcessorStepRegistry,
                               RenameObservationsProcessorStep)
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from selfflow_robot import lerobot_format as lf

from .configuration_selfflow import SelfFlowConfig


def _check(mode: str, streams: dict) -> dict:
    return {key: lf.stream_stats(s, mode, key) for key, s in (streams or {}).items()}


@ProcessorStepRegistry.register(name=lf.NORMALIZER_STEP)
@dataclass
class SelfFlowNormalizerStep(ProcessorStep):
    """observation.state and (in training batches) action -> model space."""

    mode: str = "q99"
    streams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.streams = _check(self.mode, self.streams)

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        out = transition.copy()
        obs = out.get(TransitionKey.OBSERVATION)
        if obs is not None and lf.STATE in self.streams and lf.STATE in obs:
            obs = dict(obs)
            obs[lf.STATE] = lf.normalize(torch.as_tensor(obs[lf.STATE]), self.streams[lf.STATE], self.mode)
            out[TransitionKey.OBSERVATION] = obs
        action = out.get(TransitionKey.ACTION)
        if action is not None and lf.ACTION in self.streams:
            out[TransitionKey.ACTION] = lf.normalize(torch.as_tensor(action), self.streams[lf.ACTION], self.mode)
        return out

    def get_config(self) -> dict[str, Any]:
        return {"mode": self.mode, "streams": self.streams}

    def transform_features(self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]):
        return features


@ProcessorStepRegistry.register(name=lf.UNNORMALIZER_STEP)
@dataclass
class SelfFlowUnnormalizerStep(ProcessorStep):
    """Model-space actions -> robot units: the normalised dims clipped to +-clip first, every dim
    bounded to [low, high] (robot units; None: unbounded) after."""

    mode: str = "q99"
    streams: dict[str, Any] = field(default_factory=dict)
    clip: float | None = 1.0
    low: list[float] | None = None
    high: list[float] | None = None

    def __post_init__(self):
        self.streams = _check(self.mode, self.streams)
        if lf.ACTION not in self.streams:
            raise ValueError(f"{lf.UNNORMALIZER_STEP}: no '{lf.ACTION}' statistics")
        dim = len(self.streams[lf.ACTION]["mask"])
        for name in ("low", "high"):
            v = getattr(self, name)
            if v is not None and len(v) != dim:
                raise ValueError(f"{lf.UNNORMALIZER_STEP}: '{name}' has {len(v)} entries, the action has {dim} dims")

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        out = transition.copy()
        action = out.get(TransitionKey.ACTION)
        if action is not None:
            out[TransitionKey.ACTION] = lf.postprocess_action(torch.as_tensor(action), self.get_config())
        return out

    def get_config(self) -> dict[str, Any]:
        return {"mode": self.mode, "streams": self.streams, "clip": self.clip, "low": self.low, "high": self.high}

    def transform_features(self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]):
        return features


def _as_list(v) -> list[float]:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    return [float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1)]


def streams_from_dataset_stats(config: SelfFlowConfig, stats: dict | None) -> dict:
    """LeRobotDataset statistics (meta/stats.json: min, max, mean, std, q01, q99, ...) as our streams."""
    need = ("q01", "q99") if config.normalization_mode == "q99" else ("mean", "std")
    streams = {}
    for key, mask in ((lf.ACTION, config.action_mask), (lf.STATE, config.state_mask)):
        if key == lf.STATE and not config.state_dim:
            continue
        s = (stats or {}).get(key)
        if s is None or any(k not in s for k in need):
            raise ValueError(f"selfflow normalization_mode={config.normalization_mode} needs {list(need)} statistics "
                             f"of '{key}' from the dataset (meta/stats.json); got {sorted(s or {})}. Recompute them "
                             "with LeRobot's augment_dataset_quantile_stats script, or use normalization_mode=mean_std")
        stream = {k: _as_list(s[k]) for k in need}
        if mask is not None:
            stream["mask"] = [bool(m) for m in mask]
        streams[key] = stream
    return streams


def bounds_from_dataset_stats(config: SelfFlowConfig, stats: dict | None) -> tuple:
    """The action bounds of config.data_margin around the dataset's action range (min/max, else q01/q99)."""
    s = (stats or {}).get(lf.ACTION) or {}
    action = {k: _as_list(s[k]) for k in ("min", "max", "q01", "q99") if s.get(k) is not None}
    return lf.action_bounds({"action": action}, config.action_dim, config.data_margin)


def make_selfflow_pre_post_processors(config: SelfFlowConfig, dataset_stats: dict | None = None):
    """Rename -> batch -> device -> our normaliser; our unnormaliser (+ bounds) -> cpu (the same steps
    the exporter writes as JSON, selfflow_robot.lerobot_format.pipelines)."""
    streams = streams_from_dataset_stats(config, dataset_stats)
    low, high = bounds_from_dataset_stats(config, dataset_stats)
    mode = config.normalization_mode
    pre = PolicyProcessorPipeline[dict[str, Any], dict[str, Any]](
        steps=[RenameObservationsProcessorStep(rename_map={}), AddBatchDimensionProcessorStep(),
               DeviceProcessorStep(device=config.device), SelfFlowNormalizerStep(mode=mode, streams=streams)],
        name=lf.PREPROCESSOR)
    post = PolicyProcessorPipeline[PolicyAction, PolicyAction](
        steps=[SelfFlowUnnormalizerStep(mode=mode, streams={lf.ACTION: streams[lf.ACTION]},
                                        clip=config.normalized_clip if mode == "q99" else None,
                                        low=low, high=high),
               DeviceProcessorStep(device="cpu")],
        name=lf.POSTPROCESSOR, to_transition=policy_action_to_transition, to_output=transition_to_policy_action)
    return pre, post
