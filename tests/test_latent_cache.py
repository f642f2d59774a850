"""Cached latents (clip.cached_latents): encoded once, resumable, keyed by the weights, and the
same tokens as encoding in the step."""
import logging
import os

import numpy as np
import pytest
import torch

from selfflow_robot.data import ClipDataset, DataError, EpisodeStore, EpisodeWriter
from selfflow_robot.data.latent_cache import encode_store, open_cache
from selfflow_robot.models import build_model
from selfflow_robot.models.autoencoder import FrameAutoencoder
from tests.test_e2e_train import TINY, losses, run


def _store(path, episodes=5, steps=7, size=(24, 40)):
    """Random frames in shards of two episodes, so that caching has several shards to resume."""
    rng = np.random.default_rng(0)
    meta = {"source": "test", "image_shape": [*size, 3], "action_dim": 2}
    with EpisodeWriter(str(path), meta=meta, shard_bytes=2 * steps * size[0] * size[1] * 3) as w:
        for ep in range(episodes):
            w.add(key=f"ep{ep}", images=rng.integers(0, 256, (steps, *size, 3), dtype=np.uint8),
                  actions=rng.normal(size=(steps, 2)).astype(np.float32), instruction="x")
    return EpisodeStore(str(path))


def _ae(seed=0):
    torch.manual_seed(seed)
    return FrameAutoencoder(channels=4, width=8, downsample=4).eval().requires_grad_(False)


def test_cached_clips_give_the_tokens_of_encoding_in_the_step(tmp_path):
    store = _store(tmp_path / "s")
    assert len(store.shard_names) == 3
    ae = _ae()
    cache = encode_store(store, ae, (16, 32), progress=False)  # resized 24x40 -> 16x32 as the clips are
    assert cache.latent_shape == (4, 8, 4)
    model = build_model("tiny", autoencoder={"channels": 4, "width": 8, "downsample": 4}, patch_size=2)
    model.autoencoder.load_state_dict(ae.state_dict())
    cached = ClipDataset(store, 2, 3, frame_stride=2, action_chunk=4, image_size=(16, 32), latents=cache, frames=False)
    plain = ClipDataset(store, 2, 3, frame_stride=2, action_chunk=4, image_size=(16, 32))
    for i in (0, 9, len(plain) - 1):  # first, middle and last episode (three different shards)
        a, b = cached[i], plain[i]
        assert "future" not in a and a["future_latents"].dtype == np.float16
        np.testing.assert_array_equal(a["actions"], b["actions"])
        for key in ("context", "future"):
            from_cache = model.latents_to_tokens(torch.from_numpy(a[f"{key}_latents"])[None])
            in_step = model.frames_to_tokens(torch.from_numpy(b[key])[None])
            torch.testing.assert_close(from_cache, in_step, atol=2e-3, rtol=2e-3)  # float16 storage


def test_a_killed_encoding_resumes_and_other_weights_get_their_own_cache(tmp_path, caplog):
    store = _store(tmp_path / "s")
    ae = _ae()
    first = encode_store(store, ae, (24, 40), progress=False)
    victim = os.path.join(first.path, store.shard_names[1] + ".npy")
    kept = os.path.join(first.path, store.shard_names[0] + ".npy")
    before = os.stat(kept).st_mtime_ns
    os.remove(victim)  # as if the run was killed while encoding shard 1
    assert open_cache(store, ae, (24, 40)) is None
    with caplog.at_level(logging.INFO, logger="selfflow_robot.data.latent_cache"):
        again = encode_store(store, ae, (24, 40), progress=False)
    # shard 1 only (two 7-step episodes); shards 0 and 2 kept
    assert "encoding 14 frames (1 shard(s))" in caplog.text and "21 frames already cached" in caplog.text
    assert os.stat(kept).st_mtime_ns == before and os.path.isfile(victim)
    assert open_cache(store, ae, (24, 40)).path == again.path == first.path
    other = encode_store(store, _ae(seed=1), (24, 40), progress=False)
    assert other.path != first.path  # retrained weights never read stale latents
    assert open_cache(store, ae, (12, 20)) is None  # nor does another frame size


def test_a_damaged_cache_file_is_named(tmp_path):
    store = _store(tmp_path / "s", episodes=2)
    ae = _ae()
    cache = encode_store(store, ae, (24, 40), progress=False)
    bad = os.path.join(cache.path, store.shard_names[0] + ".npy")
    with open(bad, "wb") as f:
        f.write(b"not an array")
    with pytest.raises(DataError, match=f"{bad}: unreadable cached latents .* delete the file"):
        encode_store(store, ae, (24, 40), progress=False)


def test_a_finished_cache_is_read_without_writing_and_a_read_only_store_is_named(tmp_path, monkeypatch):
    import selfflow_robot.data.latent_cache as lc

    store, ae = _store(tmp_path / "s", episodes=2), _ae()
    done = encode_store(store, ae, (24, 40), progress=False)

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(lc, "write_json_atomic", refuse)
    monkeypatch.setattr(lc.os, "makedirs", refuse)
    assert encode_store(store, ae, (24, 40), progress=False).path == done.path  # nothing to write
    with pytest.raises(DataError, match=r"cannot write the latent cache .*/latents/\w+: Read-only file system; "
                                        r"set clip.cached_latents_dir"):
        encode_store(store, _ae(seed=1), (24, 40), progress=False)
    monkeypatch.undo()
    elsewhere = encode_store(store, _ae(seed=1), (24, 40), progress=False, root=str(tmp_path / "cache"))
    assert elsewhere.path.startswith(str(tmp_path / "cache" / "s-"))
    assert open_cache(store, _ae(seed=1), (24, 40), root=str(tmp_path / "cache")).path == elsewhere.path


class _NaNAfter(torch.nn.Module):
    """An encoder whose second call gives NaN: the run stops partway through a shard."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.w = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        self.calls += 1
        z = x[:, :, ::4, ::4].repeat(1, 2, 1, 1)[:, :4] * self.w
        return z * float("nan") if self.calls == 3 else z  # call 1 is the shape probe


def test_a_stopped_shard_leaves_no_partial_file_and_dead_runs_partials_are_swept(tmp_path):
    import selfflow_robot.data.latent_cache as lc

    store = _store(tmp_path / "s", episodes=2)  # one shard of 14 frames: batches of 4
    with pytest.raises(DataError, match=r"shard_000000: the autoencoder gave a non-finite latent for frames 4\.\.7"):
        encode_store(store, _NaNAfter(), (24, 40), batch=4, progress=False)
    (cache_dir,) = (tmp_path / "s" / "latents").iterdir()
    assert sorted(os.listdir(cache_dir)) == ["latents.json"]
    host = lc._TMP_TAG.rsplit("-", 1)[0]
    dead = cache_dir / f".shard_000000.{host}-999999999.tmp.npy"  # no such pid
    live = cache_dir / f".shard_000000.{host}-{os.getpid()}.tmp.npy"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    lc._remove_dead_temporaries(str(cache_dir))
    assert not dead.exists() and live.exists()
    with pytest.raises(ValueError, match="clip.cached_latents_batch=0: must be at least 1"):
        encode_store(store, _ae(), (24, 40), batch=0, progress=False)


@pytest.mark.slow
def test_training_on_cached_latents_matches_encoding_in_the_step(tmp_path):
    from tests.data_fixtures import write_blob_store

    data = write_blob_store(tmp_path / "store")
    ae = FrameAutoencoder(channels=4, width=16, downsample=4)
    ae.save(str(tmp_path / "ae"))
    args = ["dataset=store", f"data_dir={data}", *TINY, f"model.autoencoder={tmp_path / 'ae'}", "model.patch_size=2",
            "trainer.steps=3", "validation.every=0"]
    run("finetune", *args, f"run_dir={tmp_path / 'plain'}", cwd=tmp_path)
    cached = run("finetune", *args, "clip.cached_latents=true", f"run_dir={tmp_path / 'cached'}", cwd=tmp_path)
    assert "encoding 72 frames" in cached.stdout + cached.stderr and "cached latents" in cached.stdout + cached.stderr
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert a.keys() == b.keys() and np.allclose(list(a.values()), list(b.values()), rtol=1e-3, atol=1e-4)
    again = run("finetune", *args, "clip.cached_latents=true", f"run_dir={tmp_path / 'again'}", cwd=tmp_path)
    assert "encoding" not in again.stdout + again.stderr  # encoded once: the second run reads the cache
    bad = run("finetune", "dataset=store", f"data_dir={data}", *TINY, "clip.cached_latents=true", "trainer.steps=1",
              f"run_dir={tmp_path / 'bad'}", cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "clip.cached_latents=true caches autoencoder latents: it needs model.autoencoder=DIR" in bad.stderr
    off = run("finetune", *args, "clip.cached_latents=off", f"run_dir={tmp_path / 'off'}", cwd=tmp_path, check=False)
    assert off.returncode == 1 and "clip.cached_latents='off': must be true or false" in off.stderr


@pytest.mark.slow
def test_a_resume_encodes_with_the_runs_own_autoencoder(tmp_path):
    """The trainer restores the checkpoint's frozen autoencoder: the cache must be that one's, even
    when the folder model.autoencoder names now holds other weights."""
    import re
    import shutil

    from tests.data_fixtures import write_blob_store

    data = write_blob_store(tmp_path / "store")
    torch.manual_seed(0)
    FrameAutoencoder(channels=4, width=16, downsample=4).save(str(tmp_path / "ae"))
    args = ["dataset=store", f"data_dir={data}", *TINY, f"model.autoencoder={tmp_path / 'ae'}", "model.patch_size=2",
            "clip.cached_latents=true", "validation.every=0", f"run_dir={tmp_path / 'run'}"]
    first = run("finetune", *args, "trainer.steps=2", cwd=tmp_path)
    shutil.rmtree(tmp_path / "ae")
    torch.manual_seed(1)
    FrameAutoencoder(channels=4, width=16, downsample=4).save(str(tmp_path / "ae"))
    resumed = run("finetune", *args, "trainer.steps=4", "resume=true", cwd=tmp_path)

    def cache_of(proc):
        return re.search(r"data: cached latents (\S+)", proc.stdout + proc.stderr).group(1)

    assert cache_of(resumed) == cache_of(first) and "encoding" not in resumed.stdout + resumed.stderr
    assert max(losses(tmp_path / "run")) == 4


def test_flop_count_sees_latent_tokens_from_frames_and_from_the_cache():
    from selfflow_robot.objectives.self_flow import tokens_per_sample

    cfg = build_model("tiny", autoencoder={"channels": 4, "width": 8, "downsample": 4}, patch_size=2).cfg
    frames = {"context": torch.zeros(1, 1, 32, 48, 3, dtype=torch.uint8),
              "future": torch.zeros(1, 2, 32, 48, 3, dtype=torch.uint8)}
    latents = {"context_latents": torch.zeros(1, 1, 8, 12, 4), "future_latents": torch.zeros(1, 2, 8, 12, 4)}
    # a 2x2 patch of 4x-downsampled latents covers 8x8 pixels: 3 frames x 4 x 6 tokens either way
    assert tokens_per_sample(frames, cfg) == tokens_per_sample(latents, cfg) == 72


@pytest.mark.slow
def test_two_ranks_share_the_encoding_and_train_on_the_cache(tmp_path):
    from tests.test_distributed import torchrun

    store = _store(tmp_path / "s", episodes=6)  # 3 shards: rank 0 encodes shards 0 and 2, rank 1 shard 1
    FrameAutoencoder(channels=4, width=8, downsample=4).save(str(tmp_path / "ae"))
    out = torchrun(["-m", "selfflow_robot.finetune", "dataset=store", f"data_dir={store.path}", "model=tiny",
                    "model.patch_size=2", f"model.autoencoder={tmp_path / 'ae'}", "clip.cached_latents=true",
                    "clip.image_size=[24,40]", "trainer.batch_size=4", "trainer.num_workers=0", "trainer.steps=2",
                    "trainer.warmup_steps=1", "trainer.parallel=ddp", "logger.wandb=disabled",
                    "logger.progress_bar=false", "hydra.run.dir=outputs/rank${oc.env:RANK}"], tmp_path)
    assert "encoding 28 frames (2 shard(s))" in out.stdout + out.stderr  # rank 0's part (rank 1 logs warnings only)
    from selfflow_robot.models.autoencoder import autoencoder_spec, build_frozen_autoencoder

    cache = open_cache(store, build_frozen_autoencoder(autoencoder_spec(str(tmp_path / "ae"))), (24, 40))
    assert sorted(os.listdir(cache.path)) == ["latents.json", *(f"{n}.npy" for n in store.shard_names)]
    assert (tmp_path / "outputs" / "rank0" / "checkpoints" / "latest").is_file()


def test_bf16_encoding_shares_the_key_and_differs_by_rounding_only(tmp_path):
    ae = _ae()
    fp32 = encode_store(_store(tmp_path / "a", episodes=2), ae, (24, 40), progress=False)
    bf16 = encode_store(_store(tmp_path / "b", episodes=2), ae, (24, 40), progress=False, precision="bf16")
    assert os.path.basename(fp32.path) == os.path.basename(bf16.path) and bf16.info["encoded_with"] == "bf16"
    a, b = fp32.rows(0, range(7)).astype(np.float32), bf16.rows(0, range(7)).astype(np.float32)
    assert 0 < np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    with pytest.raises(ValueError, match="precision must be bf16|fp32"):
        encode_store(_store(tmp_path / "c", episodes=1), ae, (24, 40), progress=False, precision="fp16")
