"""RLDS / TFDS episodes (RT-1 `fractal20220817_data`, Bridge, other OXE sets) without TensorFlow.

The feature structure comes from the builder directory (`dataset_info.json`, `features.json`)
through tensorflow-datasets, which does not import TensorFlow for this. Records are read
straight from the tfrecord shards (lengths and CRC32C checked) and parsed as
`tf.train.Example` protos with the `tfrecord` package's copy of the proto; JPEG frames are
decoded with PIL (with libjpeg's DCT downscaling when a smaller output size is asked for).
TensorFlow must stay out of training processes: it segfaults MuJoCo rendering.

A small key mapping (configs/dataset/rt1.yaml, bridge.yaml) says which flattened feature is the
image, the instruction, the action parts, the gripper and its convention, and the state.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError, SkipLog, check_data_dir

GRIPPER_MODES = ("none", "rel2abs", "invert")
_EXAMPLE_DIR = ".../fractal20220817_data/0.1.0"


def check_builder_dir(data_dir, dataset: str = "an RLDS dataset") -> str:
    """The expanded TFDS builder directory, or an error saying what is wrong with `data_dir`
    (missing, or a parent folder: then the version folder(s) inside it are named)."""
    path = check_data_dir(data_dir, dataset, f"the TFDS builder directory, e.g. {_EXAMPLE_DIR}")
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    # The dataset folder (fractal20220817_data) or the folder above it (synthetic_rt1's OUT)
    found = sorted(os.path.dirname(p) for depth in ("*", "*/*")
                   for p in glob.glob(os.path.join(glob.escape(path), depth, "dataset_info.json")))
    hint = (f"; did you mean '{found[0]}'?" if len(found) == 1 else
            f"; did you mean one of {found[:5]}?" if found else f", e.g. {_EXAMPLE_DIR}")
    raise FileNotFoundError(f"'{path}' is not a TFDS builder directory (it needs dataset_info.json, features.json "
                            f"and tfrecord shards{hint}); pass data_dir=PATH")


def shard_lengths(data_dir: str, split: str) -> dict:
    """{shard file name: episode count} from dataset_info.json's splits[].shardLengths (TFDS's
    `-NNNNN-of-MMMMM` names only); {} when it does not say."""
    try:
        with open(os.path.join(data_dir, "dataset_info.json"), encoding="utf-8") as f:
            splits = json.load(f).get("splits") or []
        lengths = next((s.get("shardLengths") for s in splits if s.get("name") == split), None) or []
        lengths = [int(n) for n in lengths]
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
    out = {}
    for path in glob.glob(os.path.join(glob.escape(data_dir), f"*-{split}.tfrecord-*")):
        m = re.search(r"-(\d+)-of-(\d+)$", path)
        if m and int(m.group(2)) == len(lengths) and int(m.group(1)) < len(lengths):
            out[os.path.basename(path)] = lengths[int(m.group(1))]
    return out


class EpisodeSkipLog(SkipLog):
    """A SkipLog counting lost episodes, not messages: one message may stand for several
    episodes (the rest of a truncated shard), so that totals say what was really lost."""

    def __init__(self, on_error: str = "raise"):
        super().__init__(on_error)
        self.counts: list[int] = []

    def handle(self, err: DataError, lost: int = 1) -> None:
        super().handle(err)
        self.counts.append(lost)

    def __len__(self) -> int:
        return sum(self.counts)

    def report(self, what: str = "episodes") -> str:
        head = f"skipped {len(self)} {what} with bad data"
        if len(self.items) != len(self):
            head += f" ({len(self.items)} problems)"
        return head + ("" if not self.items else ":\n  " + "\n  ".join(self.items[:20]) +
                       (f"\n  ... and {len(self.items) - 20} more" if len(self.items) > 20 else ""))


def rel2abs_gripper(rel: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Relative gripper commands (+1 close, -1 open, ~0 no change) -> absolute state, 1 = open.

    Octo / OpenVLA `rel2abs_gripper_actions`: |a| <= threshold is "no change" and holds the
    previous state (forward fill); before the first event the gripper is in the state opposite
    to that event; an episode without events is assumed open.
    """
    rel = np.asarray(rel, dtype=np.float64).reshape(-1)
    events = np.where(rel < -threshold, 1.0, np.where(rel > threshold, -1.0, 0.0))  # +1 open, -1 close
    nz = np.flatnonzero(events)
    state = -events[nz[0]] if len(nz) else 1.0
    out = np.empty(len(rel), np.float32)
    for t, e in enumerate(events):
        if e != 0:
            state = e
        out[t] = state
    return out / 2 + 0.5


@dataclass
class RLDSMapping:
    """Which flattened RLDS feature is what. Keys are paths such as 'steps/action/world_vector'."""

    image: str | list = "steps/observation/image"  # a list: several cameras, tiled side by side
    instruction: str | None = "steps/observation/natural_language_instruction"
    instruction_embedding: str | None = None
    actions: list = field(default_factory=lambda: ["steps/action"])
    action_names: list | None = None
    gripper_index: int | None = None  # index in the concatenated action vector
    gripper: str = "none"  # none | rel2abs | invert (for 1 = closed conventions)
    gripper_threshold: float = 0.1
    terminate: str | None = None
    terminate_index: int | None = None  # one-hot position meaning "terminate" (RT-1: 0)
    # Append the terminate flag (0/1) as a last action dimension, so that a policy learns to stop
    # (SIMPLER's loop ends the episode, or advances the apple task's subtask, on it).
    terminate_as_action: bool = False
    state: list = field(default_factory=list)
    split: str = "train"

    @classmethod
    def from_config(cls, cfg) -> "RLDSMapping":
        d = dict(cfg)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RLDS mapping keys {unknown}; known: {sorted(known)}")
        for k in ("actions", "state", "action_names"):
            if d.get(k) is not None:
                d[k] = [str(x) for x in d[k]]
        if d.get("image") is not None and not isinstance(d["image"], str):
            d["image"] = [str(x) for x in d["image"]]
            if not d["image"] or len(set(d["image"])) != len(d["image"]):
                raise ValueError(f"rlds.image must name distinct cameras, got {d['image']}")
        if d.get("gripper", "none") not in GRIPPER_MODES:
            raise ValueError(f"rlds.gripper must be one of {GRIPPER_MODES}, got {d['gripper']!r}")
        return cls(**d)

    @property
    def cameras(self) -> list[str]:
        return [self.image] if isinstance(self.image, str) else list(self.image)


def _masked_crc(data) -> int:
    """TFRecord's masked CRC32C."""
    import crc32c

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecord(path: str):
    """Yield (record index, bytes) from a TFRecord file, checking lengths and CRC32C.

    A record whose data checksum fails is yielded as a DataError (the framing is intact, so
    the records after it are still read); a broken length field or a truncated file ends the
    file with a DataError, since nothing after it can be framed.
    """
    masked = _masked_crc
    with open(path, "rb") as f:
        i = 0
        while True:
            head = f.read(12)
            if not head:
                return
            where = dict(file=path, episode=f"{os.path.basename(path)}:{i}")
            if len(head) < 12:
                yield i, DataError("truncated record header (corrupt or partly copied file)", **where)
                return
            (length,), (length_crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
            if masked(head[:8]) != length_crc:
                yield i, DataError("corrupt record: length checksum mismatch", **where)
                return
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                yield i, DataError("truncated record (corrupt or partly copied file)", **where)
                return
            if masked(data) != struct.unpack("<I", tail)[0]:
                yield i, DataError("corrupt record: data checksum mismatch", **where)
            else:
                yield i, data
            i += 1


def write_tfrecord(path: str, records) -> None:
    """Write raw records as a TFRecord file (re-sharding, test data); the inverse of read_tfrecord."""
    def masked(data) -> bytes:
        return struct.pack("<I", _masked_crc(data))

    with open(path, "wb") as f:
        for r in records:
            head = struct.pack("<Q", len(r))
            f.write(head + masked(head) + bytes(r) + masked(bytes(r)))


def _feature_paths(node, prefix: str = "") -> list[str]:
    """Every leaf feature as a 'steps/observation/image' path (a Dataset feature holds its steps'
    FeaturesDict in .feature)."""
    if not hasattr(node, "keys") and hasattr(node, "feature"):
        return _feature_paths(node.feature, prefix)
    if not hasattr(node, "keys"):
        return [prefix.rstrip("/")]
    return [p for k in node.keys() for p in _feature_paths(node[k], f"{prefix}{k}/")]


def _missing_feature(features, key: str, data_dir: str) -> ValueError:
    import difflib

    paths = _feature_paths(features)
    close = difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
    parent = key.rsplit("/", 1)[0] + "/"
    siblings = sorted(p.rsplit("/", 1)[-1] for p in paths if p.startswith(parent) and "/" not in p[len(parent):])
    return ValueError(f"{data_dir}: the dataset has no feature '{key}'"
                      + (f" (did you mean '{close[0]}'?)" if close else "")
                      + (f"; {parent} holds {', '.join(siblings)}" if siblings else "")
                      + " (check the dataset.rlds key mapping)")


def _feature_spec(features, path: str):
    node = features
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError):
            return None
    return node


class RLDSReader:
    """Episodes of one split of a TFDS builder directory, as standardised numpy dicts.

    `image_size=(h, w)` resizes frames while decoding (None keeps the stored size). Bad data
    raises DataError naming the file, the record and the field, or under on_error='skip' is
    skipped and counted in `reader.skips`.
    """

    def __init__(self, data_dir: str, mapping: RLDSMapping, image_size=None, on_error: str = "raise"):
        data_dir = check_builder_dir(data_dir)
        import tensorflow_datasets as tfds  # no TensorFlow import on this path

        self.data_dir, self.mapping, self.skips = data_dir, mapping, EpisodeSkipLog(on_error)
        self.info = tfds.builder_from_directory(data_dir).info
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        pattern = os.path.join(data_dir, f"*-{mapping.split}.tfrecord-*")
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise FileNotFoundError(f"no tfrecord shards matching {pattern}")
        self.shard_lengths = shard_lengths(data_dir, mapping.split)
        feats = self.info.features
        self.spec = {}
        for key in self._keys():
            f = _feature_spec(feats, key)
            if f is None:
                raise _missing_feature(feats, key, data_dir)
            self.spec[key] = (tuple(f.shape), f.np_dtype)
        self.cameras = mapping.cameras
        self.native_shapes = {c: tuple(self.spec[c][0]) for c in self.cameras}
        self.native_image_shape = self.native_shapes[self.cameras[0]]
        if self.image_size is None and len(set(self.native_shapes.values())) > 1:
            raise ValueError(f"{data_dir}: cameras {self.cameras} differ in size "
                             f"({list(self.native_shapes.values())}); set image_size to tile them")
        self.action_dim = sum(int(np.prod(self.spec[k][0] or (1,))) for k in mapping.actions)
        self.action_dim += int(mapping.terminate_as_action)
        self.state_dim = sum(int(np.prod(self.spec[k][0] or (1,))) for k in mapping.state)
        emb = mapping.instruction_embedding
        self.embedding_dim = int(np.prod(self.spec[emb][0])) if emb else 0

    def _keys(self):
        m = self.mapping
        keys = [*m.cameras, *m.actions, *m.state]
        keys += [k for k in (m.instruction, m.instruction_embedding, m.terminate) if k]
        return keys

    @property
    def image_shape(self) -> tuple:
        """(H, W x cameras, 3): the views side by side."""
        h, w = self.image_size or self.native_image_shape[:2]
        return (h, w * len(self.cameras), 3)

    def records(self, files=None):
        """(file, key, raw bytes) for every record; key = '<shard file name>:<record index>'.

        A shard that ends before the episode count dataset_info.json gives it (shardLengths) is
        reported with every episode lost, not only the one record that failed to read."""
        for path in files or self.files:
            seen, pending = 0, None  # the last bad record is held until we know if the file goes on
            for i, raw in read_tfrecord(path):
                if pending is not None:
                    self.skips.handle(pending)
                    pending = None
                seen = i + 1
                if isinstance(raw, DataError):
                    pending = raw
                else:
                    yield path, f"{os.path.basename(path)}:{i}", raw
            self._end_of_shard(path, seen, pending)

    def _end_of_shard(self, path: str, seen: int, pending: DataError | None) -> None:
        name = os.path.basename(path)
        expected = self.shard_lengths.get(name)
        good = seen - (pending is not None)  # records read before the last one, if that failed
        if expected is None or expected <= good + (pending is not None):
            if pending is not None:
                self.skips.handle(pending)
            return
        lost = expected - good
        ended = (f"the shard ended after {good} of {expected} episodes (dataset_info.json shardLengths; "
                 f"truncated or partly copied file): {lost} episodes lost")
        if pending is not None:
            self.skips.handle(DataError(f"{pending.problem}; {ended}", file=pending.file, episode=pending.episode,
                                        field=pending.field), lost)
        else:
            self.skips.handle(DataError(ended, file=path, episode=f"{name}:{good}..{expected - 1}"), lost)

    def episodes(self, files=None, skip_keys=None):
        """Yield standardised episodes; keys in `skip_keys` are not decoded (resuming)."""
        for path, key, raw in self.records(files):
            if skip_keys is not None and key in skip_keys:
                continue
            try:
                yield self.decode(raw, key=key, file=path)
            except DataError as e:
                self.skips.handle(e)

    # -- decoding --------------------------------------------------------------------------
    def decode(self, raw: bytes, key: str = "?", file: str | None = None) -> dict:
        from tfrecord import example_pb2

        ex = example_pb2.Example()
        try:
            ex.ParseFromString(raw)
        except Exception as e:  # protobuf raises its own DecodeError type
            raise DataError(f"corrupt record: not a tf.train.Example ({e})", file=file, episode=key) from None
        feats = ex.features.feature
        m = self.mapping

        def err(fieldname, problem):
            return DataError(problem, file=file, episode=key, field=fieldname)

        def values(k):
            if k not in feats:
                raise err(k, "missing feature")
            f = feats[k]
            kind = f.WhichOneof("kind")
            return kind, (getattr(f, kind).value if kind else [])

        jpegs = {c: values(c)[1] for c in m.cameras}
        t = len(jpegs[m.cameras[0]])
        if t == 0:
            raise err(m.cameras[0], "empty episode (0 steps)")
        for c, v in jpegs.items():
            if len(v) != t:
                raise err(c, f"{len(v)} images for {t} steps")

        def array(k, dtype=np.float32):
            kind, v = values(k)
            shape = self.spec[k][0]
            if kind == "bytes_list":
                raise err(k, "expected numbers, found bytes")
            a = np.array(v, dtype=np.float64 if kind == "float_list" else np.int64)
            n = int(np.prod(shape)) if shape else 1
            if a.size != t * n:
                raise err(k, f"misshapen: {a.size} values for {t} steps of shape {list(shape)}")
            a = a.reshape(t, n)
            if not np.isfinite(a).all():
                step, dim = np.argwhere(~np.isfinite(a))[0]
                raise err(k, f"non-finite value at step {step}, dim {dim}")
            return a.astype(dtype)

        actions = np.concatenate([array(k) for k in m.actions], axis=1)
        if m.gripper_index is not None and m.gripper != "none":
            g = actions[:, m.gripper_index]
            actions[:, m.gripper_index] = rel2abs_gripper(g, m.gripper_threshold) if m.gripper == "rel2abs" else 1 - g
        images = np.concatenate([self._decode_images(jpegs[c], err, c) for c in m.cameras], axis=2)
        ep = {"key": key, "file": file, "actions": actions, "images": images}
        if m.state:
            ep["state"] = np.concatenate([array(k) for k in m.state], axis=1)
        else:
            ep["state"] = None
        if m.instruction:
            kind, v = values(m.instruction)
            if kind != "bytes_list" or len(v) not in (1, t):
                raise err(m.instruction, f"expected one string per step, got {len(v)} {kind} values for {t} steps")
            ep["instruction"] = v[0].decode("utf-8", errors="replace")
        else:
            ep["instruction"] = ""
        ep["instruction_embedding"] = array(m.instruction_embedding)[0] if m.instruction_embedding else None
        if m.terminate:
            term = array(m.terminate)
            ep["terminate"] = (term[:, m.terminate_index] if m.terminate_index is not None else term[:, 0]) > 0.5
        else:
            ep["terminate"] = np.arange(t) == t - 1
        if m.terminate_as_action:
            ep["actions"] = np.concatenate([actions, ep["terminate"][:, None].astype(actions.dtype)], axis=1)
        return ep

    def _decode_images(self, jpegs, err, name) -> np.ndarray:
        from PIL import Image

        h0, w0 = self.native_shapes[name][:2]
        h, w = self.image_size or self.native_image_shape[:2]
        out = np.empty((len(jpegs), h, w, 3), np.uint8)
        for i, b in enumerate(jpegs):
            try:
                im = Image.open(io.BytesIO(b))
                if im.size != (w0, h0):  # header size, before any decoding
                    raise err(name, f"step {i}: image is {im.size[1]}x{im.size[0]}, expected {h0}x{w0}")
                if (h, w) != (h0, w0):
                    im.draft("RGB", (w, h))  # JPEG: decode at 1/2, 1/4, 1/8 scale directly
                im = im.convert("RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                out[i] = np.asarray(im)
            except DataError:
                raise
            except Exception as e:  # PIL raises several types for broken JPEG data
                raise err(name, f"step {i}: cannot decode image ({type(e).__name__}: {e})") from None
        return out

