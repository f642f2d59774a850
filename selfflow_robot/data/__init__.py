"""Data: episode store, clip sampler, normalisation, and the sources that convert into the store
(Meta-World collection, RT-1 / generic RLDS, video and image folders)."""
from .clips import ClipDataset
from .errors import DataError
from .normalize import ActionNormalizer
from .sources import make_normalizer, open_store, store_path
from .store import EpisodeStore, EpisodeWriter

__all__ = ["ActionNormalizer", "ClipDataset", "DataError", "EpisodeStore", "EpisodeWriter", "make_normalizer",
           "open_store", "store_path"]
