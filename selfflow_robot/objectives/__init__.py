"""Training objectives, kept separate from the network (SiT's `transport` split)."""
from .flow import interpolate, sample_time, shift_time, velocity_target
from .self_flow import KINDS, ObjectiveConfig, SelfFlowObjective, projection_head


def build_objective(cfg: dict, model_cfg):
    """cfg: the `objective` config group (kind, time distribution, R_M, weights, ...)."""
    cfg = dict(cfg)
    oc = ObjectiveConfig.from_dict(cfg)
    if oc.kind == "repa":
        from .repa import REPAObjective

        return REPAObjective(oc, model_cfg, dict(cfg.get("encoder") or {}))
    return SelfFlowObjective(oc, model_cfg)


__all__ = ["KINDS", "ObjectiveConfig", "SelfFlowObjective", "build_objective", "interpolate", "projection_head",
           "sample_time", "shift_time", "velocity_target"]
