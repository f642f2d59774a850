"""Sampler math against an exact velocity field: Gaussian data, where E[eps - x0 | x_t] is known."""
from types import SimpleNamespace

import pytest
import torch

from selfflow_robot.sampling import SDE_LAST_STEP, euler_sample, sde_step, time_grid

MU, SIGMA = 1.5, 0.5  # data x0 ~ N(MU, SIGMA^2) in every dimension


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t = x] for x_t = (1 - t) x0 + t eps, eps ~ N(0, 1)."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    centred = x - (1 - t) * MU
    eps_hat = t / var * centred
    x0_hat = MU + (1 - t) * SIGMA**2 / var * centred
    return eps_hat - x0_hat


class GaussianModel:
    """Just enough of SelfFlowDiT's interface for euler_sample: no conditioning, exact velocities."""

    type_embed = torch.zeros(1)
    cfg = SimpleNamespace(isolate_condition=True)
    encode_prefix = None

    def modulation_schedule(self, ts, batch):
        return [None] * len(ts)

    def __call__(self, video=None, video_t=None, action=None, action_t=None, modulation=None, **cond):
        return {"video": exact_velocity(video, video_t) if video is not None else None,
                "action": exact_velocity(action, action_t) if action is not None else None}


@pytest.mark.parametrize("method,steps", [("ode", 100), ("sde", 200)])
def test_samplers_reach_the_data_distribution(method, steps):
    g = torch.Generator().manual_seed(0)
    out = euler_sample(GaussianModel(), steps=steps, video_shape=(40_000, 1, 1, 1, 1), action_shape=(40_000, 1, 1),
                       generator=g, method=method)
    for x in out.values():
        assert x.mean().item() == pytest.approx(MU, abs=0.02)
        assert x.std().item() == pytest.approx(SIGMA, abs=0.02)


def test_sde_noise_matters_and_is_seeded():
    run = lambda seed: euler_sample(GaussianModel(), steps=20, action_shape=(8, 2, 1), method="sde",  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed))["action"]
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_sde_step_by_hand():
    x, v, t, h = torch.tensor([0.8]), torch.tensor([0.5]), torch.tensor(0.6), torch.tensor(0.1)
    eps_hat = 0.8 + 0.4 * 0.5  # x + (1 - t) v
    drift = 0.5 + eps_hat  # v - w(t) * score, w = t, score = -eps_hat / t
    assert sde_step(x, v, t, h, None).item() == pytest.approx(0.8 - 0.1 * drift)
    z = torch.tensor([2.0])
    assert sde_step(x, v, t, h, z).item() == pytest.approx(0.8 - 0.1 * drift + (2 * 0.6 * 0.1) ** 0.5 * 2.0)


def test_time_grids():
    assert torch.allclose(time_grid(4, "ode"), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    sde = time_grid(5, "sde")
    assert len(sde) == 6 and sde[0] == 1 and sde[-2].item() == pytest.approx(SDE_LAST_STEP) and sde[-1] == 0
    with pytest.raises(ValueError, match="steps >= 2"):
        time_grid(1, "sde")
    with pytest.raises(ValueError, match="ode"):
        time_grid(4, "heun")


@pytest.mark.parametrize("mode", ["action_first", "joint"])
def test_compiled_policy_sampler_compiles_once(monkeypatch, mode):
    """A robot calls the compiled sampler once per observation: after the first chunk, no call may
    recompile (each recompile cost seconds on the GPU, and after 8 the model fell back to eager)."""
    import numpy as np
    from torch._dynamo.testing import CompileCounter

    from selfflow_robot.models import build_model
    from selfflow_robot.sampling import ActionSampler

    torch._dynamo.reset()
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, dynamic=False))
    model = build_model("tiny", depth=2, action_dim=3, state_dim=2)
    io = {"action_dim": 3, "action_chunk": 4, "image_size": [32, 32], "context_frames": 2, "future_frames": 1}
    sampler = ActionSampler(model, {"io": io}, steps=3, mode=mode, compile=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        sampler(image, "pick coke can", state=rng.normal(size=2).astype(np.float32))
        if i == 0:
            first = counter.frame_count
    assert first >= 2 and counter.frame_count == first  # prefix + step graphs, then replays only
