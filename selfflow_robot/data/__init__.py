"""Data: episode store, clip sampler, normalisation, and the sources that convert into the store
(Meta-World collection, RT-1 / generic RLDS, video and image folders)."""
from .clips import ClipDataset
from .errors import DataError
from .normalize import ActionNormalizer
from .store import EpisodeStore, EpisodeWriter

__all__ = ["ActionNormalizer", "ClipDataset", "DataError", "EpisodeStore", "EpisodeWriter", "open_store"]


def open_store(dataset_cfg, **kw) -> EpisodeStore:
    """The episode store for a `configs/dataset/*.yaml` config, converting or collecting it
    first when it is not there yet (cached and resumable). See selfflow_robot.data.sources."""
    from .sources import open_store as _open

    return _open(dataset_cfg, **kw)
