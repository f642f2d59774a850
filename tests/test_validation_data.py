"""A NaN in a held-out validation episode is named before training, as one in a training episode is."""
import os
import subprocess
import sys

import numpy as np

from selfflow_robot.validation import split_episodes
from tests.data_fixtures import write_blob_store


def test_nan_in_the_validation_episode_is_an_error_naming_it(tmp_path):
    store = write_blob_store(tmp_path / "store")  # 6 episodes of 12 steps in one shard
    _, (val,) = split_episodes(6, 0.1, seed=0)
    f = os.path.join(store, "shard_000000", "actions.npy")
    a = np.load(f)
    a[12 * val + 2, 1] = np.nan
    np.save(f, a)
    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.finetune", "dataset=store", f"data_dir={store}",
                           "model=tiny", "trainer.steps=2", "trainer.batch_size=8", "trainer.num_workers=0", "logger.wandb=disabled",
                           "logger.progress_bar=false", "clip.image_size=[32,32]", f"run_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert f"held-out validation episode: {store}: episode {val} (ep{val}) has a non-finite action" in proc.stderr
