"""A pluggable instruction encoder for policies trained with `model.text=embedding`.

Such a policy was conditioned on the dataset's precomputed sentence embedding (RT-1: the 512-d
Universal Sentence Encoder vector), which this toolkit cannot compute from a sentence. Either
the robot sends `obs["instruction_embedding"]` itself, or the policy is given a text encoder:
a callable `encode(instruction: str) -> 1-D float array`, or its import path "module:function"
(so it can be named on a command line: `serve text_encoder=my_use:embed`,
`evaluate policy_kwargs.text_encoder=my_use:embed`). It must be the encoder the training data
used, or the policy sees vectors it never learned from.
"""
from __future__ import annotations

import importlib
from typing import Callable

import numpy as np


def load_text_encoder(spec) -> Callable[[str], np.ndarray] | None:
    """None, a callable, or "module:function" (imported here; errors name the spec)."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"text_encoder={spec!r}: give a callable or an import path 'module:function' "
                         f"(e.g. text_encoder=my_use:embed)")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"text_encoder={spec}: cannot import module {module_name!r} ({e})") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"text_encoder={spec}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"text_encoder={spec}: {attr!r} is not callable")
    return fn


class CachedEncoder:
    """Calls the encoder once per distinct instruction (an episode repeats one) and checks its output."""

    def __init__(self, fn: Callable[[str], np.ndarray], dim: int, name: str):
        self.fn, self.dim, self.name = fn, int(dim), name
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, instruction: str) -> np.ndarray:
        if instruction not in self._cache:
            emb = np.asarray(self.fn(instruction), dtype=np.float32).reshape(-1)
            if emb.shape[0] != self.dim or not np.all(np.isfinite(emb)):
                raise ValueError(f"text_encoder {self.name} returned {emb.shape[0]} values"
                                 f"{'' if np.all(np.isfinite(emb)) else ' (not all finite)'} for "
                                 f"{instruction!r}; this policy was trained on {self.dim}-d instruction embeddings")
            if len(self._cache) > 1024:  # a server's clients may send many distinct instructions
                self._cache.clear()
            self._cache[instruction] = emb
        return self._cache[instruction]
