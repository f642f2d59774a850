"""Data: episode store, clip sampler, normalisation, and the sources that convert into the store
(Meta-World collection, RT-1 / generic RLDS, video and image folders)."""
from .clips import ClipDataset
from .errors import DataError
from .normalize import ActionNormalizer
from .store import EpisodeStore, EpisodeWriter

__all__ = ["ActionNormalizer", "ClipDataset", "DataError", "EpisodeStore", "EpisodeWriter", "make_normalizer",
           "open_store", "store_path"]


def open_store(dataset_cfg, **kw) -> EpisodeStore:
    """The episode store for a `configs/dataset/*.yaml` config, converting or collecting it
    first when it is not there yet (cached and resumable). See selfflow_robot.data.sources."""
    from .sources import open_store as _open

    return _open(dataset_cfg, **kw)


def make_normalizer(store: EpisodeStore, dataset_cfg, episodes=None) -> ActionNormalizer:
    """ActionNormalizer per the dataset config's `normalization` {mode, mask}, with statistics
    over `episodes` (default: the whole store). Save it with the run: `norm.save(path)`."""
    from .sources import make_normalizer as _make

    return _make(store, dataset_cfg, episodes)


def store_path(dataset_cfg) -> str:
    """Where open_store keeps (or finds) the store of a dataset config."""
    from .sources import store_path as _path

    return _path(dataset_cfg)
