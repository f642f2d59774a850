"""The plugin against the real LeRobot (run in its Python 3.12 venv by scripts/test_lerobot_plugin.sh).

Parity: an exported checkpoint loaded through LeRobot's factory (plugin discovery, config from
config.json, weights, processors from their JSON) gives the actions that selfflow-robot's
Policy.load gives on the same observations.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_checkpoint import tiny_checkpoint  # noqa: E402

VIEWS = ["observation.images.top", "observation.images.wrist"]
# Same model code and ops on both sides: the differences left are float reassociation, if any.
ATOL = 1e-5


def _load_lerobot(path):
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()  # finds the installed lerobot_policy_selfflow distribution
    cfg = PreTrainedConfig.from_pretrained(path)
    cfg.pretrained_path = path
    policy = get_policy_class(cfg.type).from_pretrained(path, config=cfg)
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(path))
    return policy, pre, post


def _observations(n, state_dim, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):  # camera frames of another size than the model's: both sides resize
        yield {"image": rng.integers(0, 256, (48, 40, 3), dtype=np.uint8),
               "images": {"wrist": rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)},
               "state": (rng.normal(size=state_dim) * 2).astype(np.float32), "instruction": "push the red block"}


def _batch(obs):
    def img(a):
        return torch.from_numpy(a).permute(2, 0, 1).float() / 255.0  # as LeRobot's preprocess_observation

    return {VIEWS[0]: img(obs["image"]), VIEWS[1]: img(obs["images"]["wrist"]),
            "observation.state": torch.from_numpy(obs["state"]), "task": obs["instruction"]}


def test_factory_loads_the_export_and_matches_policy_load(tmp_path):
    from selfflow_robot.export_lerobot import export_lerobot
    from selfflow_robot.policies import Policy

    # The masked dim 3 (a gripper: raw model output, about -2..3 here) has a narrow data range, so
    # Policy.load's default bound (data range widened by safety.data_margin=0.1: -0.6..0.6) binds on it.
    ckpt = tiny_checkpoint(tmp_path / "ckpt", views=VIEWS, image_size=(32, 64), state_dim=3, action_dim=4,
                           action_q=([-1.0, -2.0, -3.0, -0.5], [1.0, 3.0, 5.0, 0.5]))
    out = export_lerobot(ckpt, tmp_path / "lerobot", sampler_steps=4)
    ours = Policy.load(ckpt, sampler_steps=4)
    unbounded = Policy.load(ckpt, sampler_steps=4, data_margin=None)
    policy, pre, post = _load_lerobot(out)
    assert type(policy).__name__ == "SelfFlowPolicy" and policy.config.type == "selfflow"
    worst = bound_moved = 0.0
    for obs in _observations(3, 3):  # whole chunks; the context history fills over the calls
        expected = ours.infer(obs)["actions"]
        got = post(policy.predict_action_chunk(pre(_batch(obs))))[0].numpy()
        assert got.shape == expected.shape == (4, 4)
        worst = max(worst, float(np.abs(got - expected).max()))
        bound_moved = max(bound_moved, float(np.abs(unbounded.infer(obs)["actions"] - expected).max()))
    assert worst <= ATOL, worst
    assert bound_moved > 0.1, bound_moved  # the bound binds: without it LeRobot would differ
    assert np.ptp(expected[:, 3]) > 0  # the masked dim (raw model output) varies: the weights matter
    # step by step: LeRobot's action queue against our chunker, across two chunks
    ours.reset()
    policy.reset()
    for obs in _observations(6, 3, seed=1):
        expected = ours.act(obs)
        got = post(policy.select_action(pre(_batch(obs))))[0].numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= ATOL, worst
    print(f"parity: max |LeRobot - Policy.load| = {worst:.3g} over 3 chunks and 6 steps "
          f"(the data-range bound moved actions by up to {bound_moved:.3g})")


def test_processors_lerobot_writes_equal_the_exported_json(tmp_path):
    """The exporter writes the pipeline JSON by hand (no LeRobot in the training env): LeRobot's own
    save_pretrained of the plugin's pipelines writes the same."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot_policy_selfflow.processor_selfflow import make_selfflow_pre_post_processors
    from selfflow_robot.export_lerobot import export_lerobot

    ckpt = tiny_checkpoint(tmp_path / "ckpt", views=VIEWS, image_size=(32, 64))
    out = export_lerobot(ckpt, tmp_path / "lerobot")
    cfg = PreTrainedConfig.from_pretrained(out)
    norm = json.loads((tmp_path / "ckpt" / "normalization.json").read_text())
    stats = {k: {s: np.asarray(v[s]) for s in ("q01", "q99")} for k, v in
             (("action", norm["action"]), ("observation.state", norm["state"]))}
    cfg.action_mask, cfg.state_mask = norm["action"]["mask"], norm["state"]["mask"]
    pre, post = make_selfflow_pre_post_processors(cfg, dataset_stats=stats)
    pre.save_pretrained(tmp_path / "saved")
    post.save_pretrained(tmp_path / "saved")
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        assert json.loads((tmp_path / "saved" / name).read_text()) == json.loads((out / name).read_text()), name
    # and the config round-trips through LeRobot's own writer
    cfg._save_pretrained(tmp_path / "saved")
    again = PreTrainedConfig.from_pretrained(tmp_path / "saved")
    assert again.model == cfg.model and again.input_features == cfg.input_features


def test_training_forward_gives_a_loss_and_update_moves_the_teacher(tmp_path):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot_policy_selfflow.configuration_selfflow import SelfFlowConfig
    from lerobot_policy_selfflow.modeling_selfflow import SelfFlowPolicy

    cfg = SelfFlowConfig(device="cpu", image_size=[32, 32], context_frames=2, future_frames=1, chunk_size=4,
                         n_action_steps=4, ema_decay=0.5,
                         input_features={"observation.image": PolicyFeature(FeatureType.VISUAL, (3, 48, 48)),
                                         "observation.state": PolicyFeature(FeatureType.STATE, (2,))},
                         output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))})
    assert cfg.observation_delta_indices == [-1, 0, 1] and cfg.action_delta_indices == [0, 1, 2, 3]
    policy = SelfFlowPolicy(cfg).train()
    B = 3
    batch = {"observation.image": torch.rand(B, 3, 3, 48, 48), "observation.image_is_pad": torch.zeros(B, 3, dtype=bool),
             "observation.state": torch.rand(B, 3, 2), "action": torch.rand(B, 4, 2) * 2 - 1,
             "action_is_pad": torch.tensor([[False] * 4, [False] * 4, [False, False, True, True]]),
             "task": ["push", "push", "pull"]}
    optim = cfg.get_optimizer_preset().build(policy.get_optim_params())
    loss, metrics = policy.forward(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and {"flow_action", "rep"} <= set(metrics)
    loss.backward()
    optim.step()
    teacher = policy._teacher[0]
    before = [p.clone() for p in teacher.parameters()]
    policy.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert not any(k.startswith("_teacher") for k in policy.state_dict())  # the teacher is not saved


def test_bad_features_are_named():
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot_policy_selfflow.configuration_selfflow import SelfFlowConfig
    from lerobot_policy_selfflow.modeling_selfflow import SelfFlowPolicy

    with pytest.raises(ValueError, match="at least one camera"):
        SelfFlowPolicy(SelfFlowConfig(device="cpu", input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (2,))},
            output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))}))
    with pytest.raises(ValueError, match="n_action_steps \\(9\\) must be <= chunk_size \\(8\\)"):
        SelfFlowConfig(device="cpu", n_action_steps=9)
    with pytest.raises(ValueError, match="data_margin must be a number >= 0"):
        SelfFlowConfig(device="cpu", data_margin=-0.1)
