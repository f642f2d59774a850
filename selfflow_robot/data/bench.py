"""Data throughput, per process (= per CPU core; every loop here is single-threaded):

rlds_read      RT-1-format shards -> standardised episodes, JPEG decode at the native 256x320
rlds_read_small  the same, decoding straight to the store resolution (libjpeg DCT scaling)
convert        shards -> episode store (read, decode, resize, validate, write)
convert_parallel  the same with `convert_workers` spawn processes (default: every CPU); also
               the worker start-up time and the rate after the first episode arrived
clips          ClipDataset items (N+M frames, H-step normalised chunk) at random indices
clips_resized  the same, resized on the fly (PIL bilinear) to resize_image_size
clips_batched  the same as clips, through default_collate in batches (what a DataLoader worker does)
lerobot_convert  a LeRobotDataset v3.0 folder (AV1 video at 256x320, several episodes per file) ->
               episode store at store_image_size (parquet read, video decode, resize, write)

The RT-1-format data is synthetic (selfflow_robot.data.synthetic_rt1, textured frames), written
by a TensorFlow child process; reading never imports TensorFlow.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from ..bench import cpu_name, emit


def _settings(cfg) -> dict:
    defaults = dict(work_dir=None, rlds_episodes=24, rlds_steps=40, store_image_size=[128, 160], context_frames=1,
                    future_frames=4, frame_stride=1, action_chunk=6, clips=3000, batch_size=32, resize_image_size=[64, 64],
                    convert_workers=None, lerobot_episodes=8, lerobot_steps=60, lerobot_codec="libsvtav1", out=None)
    got = cfg.get("data") if cfg is not None else None
    if got is not None:
        from omegaconf import OmegaConf

        got = OmegaConf.to_container(got, resolve=True) if not isinstance(got, dict) else got
        defaults.update(got)  # a null is meant: work_dir null = a temporary folder, resize_image_size null = skip
    return defaults


def run(s: dict) -> list[dict]:
    import torch

    from .clips import ClipDataset
    from .normalize import ActionNormalizer
    from .rlds import RLDSMapping, RLDSReader
    from .rlds_convert import convert_rlds
    from .store import EpisodeStore
    from .synthetic_rt1 import write_fractal_rlds

    torch.set_num_threads(1)
    cpu = cpu_name()
    recs = []
    if s["work_dir"]:
        os.makedirs(s["work_dir"], exist_ok=True)
    with tempfile.TemporaryDirectory(dir=s["work_dir"]) as tmp:
        builder = write_fractal_rlds(tmp, s["rlds_episodes"], s["rlds_steps"], photo=True)
        import importlib.resources

        import omegaconf

        cfg_path = importlib.resources.files("selfflow_robot.configs") / "dataset" / "rt1.yaml"
        mapping = RLDSMapping.from_config(omegaconf.OmegaConf.load(str(cfg_path)).rlds)
        frames = s["rlds_episodes"] * s["rlds_steps"]
        size = tuple(s["store_image_size"])
        for name, image_size in (("rlds_read", None), ("rlds_read_small", size)):
            reader = RLDSReader(builder, mapping, image_size=image_size)
            list(reader.episodes(files=reader.files))  # warm the page cache and imports
            t0 = time.perf_counter()
            n = sum(len(ep["actions"]) for ep in reader.episodes())
            dt = time.perf_counter() - t0
            assert n == frames
            recs.append({"bench": f"data.{name}", "frames_per_s": round(n / dt, 1), "frames": n,
                         "image": list(reader.image_shape), "processes": 1, "cpu": cpu})
        store_dir = os.path.join(tmp, "store")
        reader = RLDSReader(builder, mapping, image_size=size)
        t0 = time.perf_counter()
        convert_rlds(reader, store_dir, {"source": "bench"}, progress=False)
        dt = time.perf_counter() - t0
        recs.append({"bench": "data.convert", "frames_per_s": round(frames / dt, 1), "frames": frames,
                     "image": list(reader.image_shape), "processes": 1, "cpu": cpu})
        workers = int(s.get("convert_workers") or os.cpu_count() or 1)
        if workers > 1:  # the same data re-sharded into one file per worker
            from .rlds import read_tfrecord, write_tfrecord

            shard = reader.files[0]
            records = [r for _, r in read_tfrecord(shard)]
            os.remove(shard)
            for k in range(workers):
                write_tfrecord(os.path.join(builder, f"fractal20220817_data-train.tfrecord-{k:05d}-of-{workers:05d}"),
                               records[k::workers])
            reader = RLDSReader(builder, mapping, image_size=size)
            t0 = time.perf_counter()
            summ = convert_rlds(reader, os.path.join(tmp, "store_parallel"), {"source": "bench"}, progress=False,
                                workers=workers)
            dt = time.perf_counter() - t0
            steady = summ["steps_per_s_after_first"]
            recs.append({"bench": "data.convert_parallel", "frames_per_s": round(frames / dt, 1),
                         "startup_s": summ["first_episode_s"], "frames_per_s_after_startup": steady,
                         "frames_per_s_per_process_after_startup": steady and round(steady / workers, 1),
                         "frames": frames, "image": list(reader.image_shape), "processes": workers, "cpu": cpu})
        store = EpisodeStore(store_dir)
        ds = ClipDataset(store, context_frames=s["context_frames"], future_frames=s["future_frames"],
                         frame_stride=s["frame_stride"], action_chunk=s["action_chunk"],
                         normalizer=ActionNormalizer.from_store(store))
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(ds), s["clips"])
        for i in idx[:100]:
            ds[int(i)]
        t0 = time.perf_counter()
        for i in idx:
            ds[int(i)]
        dt = time.perf_counter() - t0
        shape = {"frames": s["context_frames"] + s["future_frames"], "image": list(store.meta["image_shape"]),
                 "action_chunk": s["action_chunk"]}
        recs.append({"bench": "data.clips", "clips_per_s": round(len(idx) / dt, 1), **shape, "processes": 1, "cpu": cpu})
        if s.get("resize_image_size"):
            small = ClipDataset(store, context_frames=s["context_frames"], future_frames=s["future_frames"],
                                frame_stride=s["frame_stride"], action_chunk=s["action_chunk"],
                                image_size=s["resize_image_size"], normalizer=ds.normalizer)
            t0 = time.perf_counter()
            for i in idx:
                small[int(i)]
            dt = time.perf_counter() - t0
            recs.append({"bench": "data.clips_resized", "clips_per_s": round(len(idx) / dt, 1),
                         **shape, "resized_to": list(small.image_size), "processes": 1, "cpu": cpu})
        bs = s["batch_size"]
        t0 = time.perf_counter()
        n = 0
        for k in range(0, len(idx) - bs + 1, bs):
            torch.utils.data.default_collate([ds[int(i)] for i in idx[k:k + bs]])
            n += bs
        dt = time.perf_counter() - t0
        recs.append({"bench": "data.clips_batched", "clips_per_s": round(n / dt, 1), "batch_size": bs, **shape,
                     "processes": 1, "cpu": cpu})
        if s.get("lerobot_episodes"):
            recs.append(_lerobot_convert(s, tmp, size, cpu))
    return recs


def _lerobot_convert(s: dict, tmp: str, size, cpu: str) -> dict:
    from .lerobot import LeRobotReader, convert_lerobot
    from .synthetic_lerobot import write_v30

    lengths = [int(s["lerobot_steps"])] * int(s["lerobot_episodes"])
    root = write_v30(os.path.join(tmp, "lerobot"), size=(256, 320), codec=s["lerobot_codec"], lengths=lengths,
                     episodes_per_file=4, texture=True)
    reader = LeRobotReader(root, image_size=size)
    t0 = time.perf_counter()
    convert_lerobot(reader, os.path.join(tmp, "store_lerobot"), {"source": "bench"}, progress=False)
    dt = time.perf_counter() - t0
    return {"bench": "data.lerobot_convert", "frames_per_s": round(sum(lengths) / dt, 1), "frames": sum(lengths),
            "video": f"{s['lerobot_codec']} 256x320", "image": list(reader.image_shape), "processes": 1, "cpu": cpu}


def main(cfg=None) -> list[dict]:
    s = _settings(cfg)
    recs = run(s)
    for r in recs:
        emit(r, s["out"])
    return recs
