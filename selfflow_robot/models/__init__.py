"""Self-Flow backbone: `build_model(name_or_cfg, **overrides)`, sizes tiny/s/b/l/xl."""
from .config import SIZES, ModelConfig, model_config
from .dit import Modulation, PrefixCache, SelfFlowDiT, TokenTimes


def build_model(name_or_cfg="tiny", **overrides) -> SelfFlowDiT:
    return SelfFlowDiT(model_config(name_or_cfg, **overrides))


def load_checkpoint_model(path, device="cpu"):
    """(model, config dict) from a checkpoint or run directory; EMA weights, no pickle."""
    from .loading import load_checkpoint_model as _load

    return _load(path, device)


__all__ = ["SIZES", "ModelConfig", "Modulation", "PrefixCache", "SelfFlowDiT", "TokenTimes", "build_model",
           "model_config", "load_checkpoint_model"]
