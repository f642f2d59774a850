"""Synthetic RLDS data with the real fractal20220817_data (RT-1) feature names, dtypes and shapes,
for tests and benchmarks (the real 111 GiB set cannot be downloaded everywhere).

`fractal_episode(i)` is the single source of truth for the contents: the writer (run in a
separate process because it imports TensorFlow, which must stay out of training and rendering
processes) and the tests (which never import TF) both call it.
`python -m selfflow_robot.data.synthetic_rt1 OUT_DIR NUM_EPISODES [STEPS] [plain|photo] [single|wrist]`
writes OUT_DIR/fractal20220817_data/0.1.0/ (see --help for what happens when it exists).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

H, W = 256, 320
# Relative gripper commands of each test episode: closes at step 2, opens at 6 (values near
# the +-0.1 threshold check its strictness); episode 1 never sends an event.
GRIPPER_PATTERNS = {
    0: [0.0, 0.05, 1.0, 0.0, 0.0, 0.09, -1.0, 0.0, 0.0, 0.0],
    1: [0.0] * 10,
    2: [-0.5, 0.0, 0.0, 0.2, 0.0, 0.0, -0.11, 0.0, 0.0, 0.0],
}


def frame(i: int, t: int, photo: bool = False) -> np.ndarray:
    """Smooth frames (JPEG-friendly, so decoded pixels stay within a few levels)."""
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([(x * 255 // W + 10 * t) % 256, (y * 255 // H + 40 * i) % 256,
                    np.full_like(x, (30 * t + 70 * i) % 256)], -1).astype(np.uint8)
    if photo:  # texture and edges, closer to a real camera image for decode timings
        rng = np.random.default_rng(1000 * i + t)
        img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        for _ in range(6):
            r0, c0 = rng.integers(0, H - 60), rng.integers(0, W - 60)
            img[r0:r0 + 50, c0:c0 + 50] = rng.integers(0, 256, 3)
    return img


def wrist_frame(i: int, t: int) -> np.ndarray:
    """The optional second camera (a DROID-style wrist view): half size, inverted colours."""
    return 255 - frame(i, t)[::2, ::2]


def fractal_episode(i: int, steps: int = 10, photo: bool = False, wrist: bool = False) -> dict:
    rng = np.random.default_rng(i)
    t = steps
    pattern = GRIPPER_PATTERNS.get(i) or list(rng.choice([0.0, 0.0, 0.0, 1.0, -1.0], t))
    grip = np.array((list(pattern) + [0.0] * t)[:t], np.float32)
    terminate = np.tile(np.array([0, 1, 0], np.int32), (t, 1))
    terminate[-1] = [1, 0, 0]
    obs = {
        "image": np.stack([frame(i, k, photo) for k in range(t)]),
        **({"wrist_image": np.stack([wrist_frame(i, k) for k in range(t)])} if wrist else {}),
        "natural_language_instruction": [f"pick object {i}".encode()] * t,
        "natural_language_embedding": np.tile(rng.normal(size=512).astype(np.float32), (t, 1)),
        "base_pose_tool_reached": rng.normal(size=(t, 7)).astype(np.float32),
        "gripper_closed": rng.uniform(size=(t, 1)).astype(np.float32),
        "gripper_closedness_commanded": rng.uniform(size=(t, 1)).astype(np.float32),
        "height_to_bottom": rng.uniform(size=(t, 1)).astype(np.float32),
        "orientation_box": rng.normal(size=(t, 2, 3)).astype(np.float32),
        "orientation_start": rng.normal(size=(t, 4)).astype(np.float32),
        "robot_orientation_positions_box": rng.normal(size=(t, 3, 3)).astype(np.float32),
        "rotation_delta_to_go": rng.normal(size=(t, 3)).astype(np.float32),
        "src_rotation": rng.normal(size=(t, 4)).astype(np.float32),
        "vector_to_go": rng.normal(size=(t, 3)).astype(np.float32),
        "workspace_bounds": rng.normal(size=(t, 3, 3)).astype(np.float32),
    }
    action = {
        "world_vector": rng.uniform(-0.5, 0.5, (t, 3)).astype(np.float32),
        "rotation_delta": rng.uniform(-0.3, 0.3, (t, 3)).astype(np.float32),
        "gripper_closedness_action": grip[:, None],
        "terminate_episode": terminate,
        "base_displacement_vector": np.zeros((t, 2), np.float32),
        "base_displacement_vertical_rotation": np.zeros((t, 1), np.float32),
    }
    flags = np.zeros(t, bool)
    return {"observation": obs, "action": action, "reward": (np.arange(t) == t - 1).astype(np.float32),
            "is_first": np.arange(t) == 0, "is_last": np.arange(t) == t - 1, "is_terminal": np.arange(t) == t - 1,
            "_flags": flags}


def _write(out_dir: str, num_episodes: int, steps: int, photo: bool, wrist: bool = False) -> None:
    import tensorflow_datasets as tfds
    from tensorflow_datasets import features as tf_f

    f32 = np.float32
    step_features = tf_f.FeaturesDict({
        "observation": tf_f.FeaturesDict({
            "image": tf_f.Image(shape=(H, W, 3), dtype=np.uint8, encoding_format="jpeg"),
            **({"wrist_image": tf_f.Image(shape=(H // 2, W // 2, 3), dtype=np.uint8, encoding_format="jpeg")}
               if wrist else {}),
            "natural_language_instruction": tf_f.Text(),
            "natural_language_embedding": tf_f.Tensor(shape=(512,), dtype=f32),
            "base_pose_tool_reached": tf_f.Tensor(shape=(7,), dtype=f32),
            "gripper_closed": tf_f.Tensor(shape=(1,), dtype=f32),
            "gripper_closedness_commanded": tf_f.Tensor(shape=(1,), dtype=f32),
            "height_to_bottom": tf_f.Tensor(shape=(1,), dtype=f32),
            "orientation_box": tf_f.Tensor(shape=(2, 3), dtype=f32),
            "orientation_start": tf_f.Tensor(shape=(4,), dtype=f32),
            "robot_orientation_positions_box": tf_f.Tensor(shape=(3, 3), dtype=f32),
            "rotation_delta_to_go": tf_f.Tensor(shape=(3,), dtype=f32),
            "src_rotation": tf_f.Tensor(shape=(4,), dtype=f32),
            "vector_to_go": tf_f.Tensor(shape=(3,), dtype=f32),
            "workspace_bounds": tf_f.Tensor(shape=(3, 3), dtype=f32),
        }),
        "action": tf_f.FeaturesDict({
            "world_vector": tf_f.Tensor(shape=(3,), dtype=f32),
            "rotation_delta": tf_f.Tensor(shape=(3,), dtype=f32),
            "gripper_closedness_action": tf_f.Tensor(shape=(1,), dtype=f32),
            "terminate_episode": tf_f.Tensor(shape=(3,), dtype=np.int32),
            "base_displacement_vector": tf_f.Tensor(shape=(2,), dtype=f32),
            "base_displacement_vertical_rotation": tf_f.Tensor(shape=(1,), dtype=f32),
        }),
        "reward": tf_f.Scalar(dtype=f32),
        "is_first": tf_f.Scalar(dtype=np.bool_),
        "is_last": tf_f.Scalar(dtype=np.bool_),
        "is_terminal": tf_f.Scalar(dtype=np.bool_),
    })
    aspects = tf_f.FeaturesDict({k: tf_f.Scalar(dtype=np.bool_) for k in
                                 ("already_success", "feasible", "has_aspects", "success", "undesirable")})
    attributes = tf_f.FeaturesDict(
        {k: tf_f.Scalar(dtype=np.int64) for k in ("collection_mode", "data_type", "env", "location",
                                                  "objects_family", "task_family")}
        | {f"{k}_name": tf_f.Text() for k in ("collection_mode", "data_type", "env", "location",
                                              "objects_family", "task_family")})

    class Fractal20220817Data(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("0.1.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tf_f.FeaturesDict(
                {"steps": tfds.features.Dataset(step_features), "aspects": aspects, "attributes": attributes}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(num_episodes):
                ep = fractal_episode(i, steps, photo, wrist)
                ep.pop("_flags")
                t = len(ep["reward"])
                steps_list = [{"observation": {k: v[s] for k, v in ep["observation"].items()},
                               "action": {k: v[s] for k, v in ep["action"].items()},
                               "reward": ep["reward"][s], "is_first": ep["is_first"][s],
                               "is_last": ep["is_last"][s], "is_terminal": ep["is_terminal"][s]}
                              for s in range(t)]
                yield i, {"steps": steps_list,
                          "aspects": {k: True for k in ("already_success", "feasible", "has_aspects",
                                                        "success", "undesirable")},
                          "attributes": {k: 0 for k in ("collection_mode", "data_type", "env", "location",
                                                        "objects_family", "task_family")}
                          | {f"{k}_name": "x" for k in ("collection_mode", "data_type", "env", "location",
                                                        "objects_family", "task_family")}}

    Fractal20220817Data.name = "fractal20220817_data"
    b = Fractal20220817Data(data_dir=out_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(max_examples_per_split=None))


def write_fractal_rlds(out_dir: str, num_episodes: int = 3, steps: int = 10, photo: bool = False,
                       wrist: bool = False) -> str:
    """Write the fixture in a child process (TF must stay out of the test process); returns
    the builder directory OUT_DIR/fractal20220817_data/0.1.0. wrist: add steps/observation/wrist_image."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.data.synthetic_rt1", out_dir, str(num_episodes),
                        str(steps), "photo" if photo else "plain", "wrist" if wrist else "single"], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"writing the synthetic RLDS data failed:\n{r.stderr[-3000:]}")
    return os.path.join(out_dir, "fractal20220817_data", "0.1.0")


MARKER = "synthetic_rt1.json"  # in the builder dir: the settings it was written with


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m selfflow_robot.data.synthetic_rt1",
        description="Write synthetic RT-1 (fractal20220817_data) RLDS data to OUT/fractal20220817_data/0.1.0 "
                    "(imports TensorFlow: run it as its own process). If that folder exists: written by this "
                    "tool with the same settings, it is kept; with other settings, it is deleted and written "
                    "again; anything else there (no synthetic_rt1.json, e.g. the real data) is refused.")
    p.add_argument("out", metavar="OUT", help="output folder (use OUT/fractal20220817_data/0.1.0 as data_dir)")
    p.add_argument("episodes", metavar="N", type=_positive, help="number of episodes")
    p.add_argument("steps", metavar="STEPS", type=_positive, nargs="?", default=10, help="steps per episode (10)")
    p.add_argument("style", nargs="?", default="plain", choices=("plain", "photo"),
                   help="plain: smooth frames; photo: textured frames, closer to real JPEG sizes (plain)")
    p.add_argument("cameras", nargs="?", default="single", choices=("single", "wrist"),
                   help="wrist: add a half-size steps/observation/wrist_image (single)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    settings = {"episodes": args.episodes, "steps": args.steps, "style": args.style, "cameras": args.cameras}
    builder = os.path.join(args.out, "fractal20220817_data", "0.1.0")
    marker = os.path.join(builder, MARKER)
    if os.path.exists(builder):
        try:
            with open(marker, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            sys.exit(f"error: {builder} exists and was not written by this tool (no readable {MARKER}); "
                     "choose another OUT or remove it")
        if old == settings:
            print(f"{builder} already holds this data ({settings}); kept")
            return 0
        print(f"{builder} holds other synthetic data ({old}); writing it again with {settings}")
        shutil.rmtree(builder)  # TFDS would otherwise keep the old episodes
    _write(args.out, args.episodes, args.steps, args.style == "photo", args.cameras == "wrist")
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(settings, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
