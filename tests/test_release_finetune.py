"""Fine-tuning from converted release weights with an SD-VAE-style (diffusers AutoencoderKL) latent
space: `finetune dataset=rt1 init=CONVERTED model=selfflow_xl model.autoencoder=VAE_DIR`, tiny sizes."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from test_e2e_train import TINY, run
from test_sample_images import tiny_vae
from test_selfflow_release import official_model

from selfflow_robot.convert import convert_release, write_converted

pytest.importorskip("diffusers")


def converted(tmp_path, classes=1001):
    official = official_model(size=8, width=64, depth=2, heads=4, classes=classes)
    model, head, _ = convert_release(official.state_dict(), "test", heads=4, student_layer=1, teacher_layer=2)
    return write_converted(model, head, tmp_path / "conv", {"format": "selfflow_release"}), head


def test_diffusers_autoencoder_frozen_in_model(tmp_path):
    from selfflow_robot.models import build_model

    vae = tiny_vae(tmp_path / "vae")
    model = build_model("tiny", autoencoder=str(tmp_path / "vae"), patch_size=2, text="none")
    spec = model.cfg.autoencoder
    assert spec["kind"] == "diffusers_kl" and spec["downsample"] == 2 and model.cfg.in_channels == 4
    for k, v in vae.state_dict().items():  # DiT init leaves the VAE's (linear attention) weights alone
        torch.testing.assert_close(model.autoencoder.vae.state_dict()[k], v)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    x = torch.randint(0, 256, (1, 2, 16, 24, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = vae.encode(x[0].float().div(127.5).sub(1).permute(0, 3, 1, 2)).latent_dist.mean * vae.config.scaling_factor
    tok = model.frames_to_tokens(x)
    assert tok.shape == (1, 2, 4, 6, 16)
    torch.testing.assert_close(tok[0], want.permute(0, 2, 3, 1).unflatten(1, (4, 2)).unflatten(3, (6, 2))
                               .permute(0, 1, 3, 2, 4, 5).flatten(3), rtol=1e-5, atol=1e-5)
    assert model.tokens_to_frames(tok).shape == (1, 2, 16, 24, 3)
    os.remove(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model\.safetensors there"):
        build_model("tiny", autoencoder=str(tmp_path / "vae"))


def test_init_loads_backbone_and_release_head(tmp_path):
    from selfflow_robot.models import build_model
    from selfflow_robot.models.loading import load_backbone, load_objective_head
    from selfflow_robot.objectives import build_objective

    conv, head = converted(tmp_path)
    tiny_vae(tmp_path / "vae")
    model = build_model("tiny", patch_size=2, positions="sincos2d", num_classes=1001, autoencoder=str(tmp_path / "vae"),
                        action_dim=7, text="embedding", student_layer=1, teacher_layer=2)
    created = load_backbone(model, conv)
    assert {k.split(".")[0] for k in created} == {"action_embed", "action_head", "text_encoder"}
    objective = build_objective({"kind": "self_flow"}, model.cfg)
    assert load_objective_head(objective, conv)
    torch.testing.assert_close(objective.head[0].weight, head["head.0.weight"])
    with pytest.raises(ValueError, match=r"positions sincos2d vs rope.*converted Self-Flow release: fine-tune it "
                                         r"with model=selfflow_xl"):
        load_backbone(build_model("tiny", patch_size=2, in_channels=4, action_dim=7), conv)


@pytest.mark.slow
def test_finetune_rt1_from_converted_release(tmp_path):
    from selfflow_robot.data.synthetic_rt1 import write_fractal_rlds
    from selfflow_robot.models import load_checkpoint_model

    conv, _ = converted(tmp_path)
    tiny_vae(tmp_path / "vae")
    builder = write_fractal_rlds(str(tmp_path / "rlds"), num_episodes=3, steps=10)
    out = tmp_path / "ft"
    tiny = [a for a in TINY if not a.startswith(("model=", "clip.image_size"))]
    run("finetune", "dataset=rt1", f"data_dir={builder}", f"init={conv}", "model=selfflow_xl", "model.depth=2",
        "model.width=64", "model.heads=4", "model.student_layer=1", "model.teacher_layer=2",
        f"model.autoencoder={tmp_path / 'vae'}", "model.text=embedding", *tiny, "dataset.image_size=[32,40]",
        "clip.image_size=null", "trainer.steps=2", f"run_dir={out}", cwd=tmp_path,
        env_extra={"SELFFLOW_DATA_CACHE": str(tmp_path / "cache")})
    ckpt = out / "checkpoints" / "step_00000002"
    config = json.load(open(ckpt / "config.json"))
    assert config["model"]["autoencoder"]["kind"] == "diffusers_kl" and config["io"]["image_size"] == [32, 40]
    shutil.rmtree(tmp_path / "vae")  # the checkpoint carries the frozen VAE: policies/serving load it alone
    model, _ = load_checkpoint_model(out)
    tok = model.frames_to_tokens(torch.zeros(1, 1, 32, 40, 3, dtype=torch.uint8))
    assert tok.shape == (1, 1, 8, 10, 16)  # 32x40 px -> 16x20 latents -> 8x10 tokens of 2x2x4
    from selfflow_robot.policies.policy import Policy

    policy = Policy.load(out, sampler_steps=2)  # the policy/serving path: SD-VAE latents of the robot's frame
    r = policy.infer(policy.example_observation())
    assert r["actions"].shape == (6, 7) and np.isfinite(r["actions"]).all()
