"""What the pretraining study measures besides success: a linear probe of the backbone's features
for object and goal positions, and world-model rollout quality (PSNR/SSIM) on held-out episodes.

The probe reads the residual stream after one block for a single clean frame (no text, no state),
flattened over its patch tokens, and fits ridge regression to Meta-World's state: hand, object and
goal positions (the raw 39-d observation, indices below). It is fitted on some held-out episodes
and scored (R^2) on others, split by episode so no frame of a test episode is seen in fitting.
"""
from __future__ import annotations

import numpy as np
import torch

# Meta-World's 39-d observation: hand xyz 0:3, gripper 3, first object xyz 4:7, its quaternion
# 7:11, second object 11:18, the previous frame's 18 values 18:36, goal xyz 36:39.
PROBE_TARGETS = {"hand": slice(0, 3), "object": slice(4, 7), "goal": slice(36, 39)}


def ridge_probe(x_train, y_train, x_test, y_test, alpha: float = 1.0) -> dict:
    """Ridge regression on standardised features; out-of-sample R^2 per target column on the test set,
    against predicting the training mean (0: no better than that; negative: worse). The training
    mean, not the test set's own, keeps R^2 defined when a label is constant over the test episodes."""
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train, y_test = np.asarray(y_train, np.float64), np.asarray(y_test, np.float64)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    xa, xb = (x_train - mu) / sd, (x_test - mu) / sd
    ym = y_train.mean(0)
    # Dual form when there are more features than samples: (X X^T + a I)^-1 is n x n.
    n, d = xa.shape
    if d > n:
        w = xa.T @ np.linalg.solve(xa @ xa.T + alpha * np.eye(n), y_train - ym)
    else:
        w = np.linalg.solve(xa.T @ xa + alpha * np.eye(d), xa.T @ (y_train - ym))
    pred = xb @ w + ym
    sse = ((pred - y_test) ** 2).sum(0)
    sst = ((y_test - ym) ** 2).sum(0)
    return {"r2": (1 - sse / np.maximum(sst, 1e-12)).tolist(), "pred": pred}


@torch.no_grad()
def backbone_features(model, frames: np.ndarray, layer: int, batch: int = 64) -> np.ndarray:
    """Block `layer`'s residual stream for each uint8 frame [N, H, W, 3] given as one clean
    generated frame (t = 0): [N, tokens * width]."""
    dev = model.type_embed.device
    out = []
    for i in range(0, len(frames), batch):
        f = torch.as_tensor(frames[i:i + batch]).to(dev)[:, None]  # [B, 1, H, W, 3]
        tokens = model.frames_to_tokens(f)
        zero = torch.zeros(tokens.shape[0], device=dev)
        feats = model(video=tokens, video_t=zero, taps=(layer,), stop_after=layer)["features"][layer]
        out.append(feats.float().flatten(1).cpu().numpy())
    return np.concatenate(out)


def probe_data(store, image_size, every: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (resized), labels (hand, object, goal xyz) and episode keys ("task/seed...") from a
    store collected with state_mode=full, every `every`-th step."""
    from .sampling import resize_frame

    if int(store.meta.get("state_dim") or 0) != 39:
        raise ValueError(f"probe store {store.path}: needs Meta-World's full 39-d state (state_mode=full), "
                         f"has state_dim {store.meta.get('state_dim')}")
    frames, labels, eps = [], [], []
    cols = np.r_[tuple(PROBE_TARGETS.values())]
    for i in range(len(store)):
        idx = np.arange(0, store.episode_length(i), every)
        imgs, state = store.frames(i, idx), store.state(i)[idx]
        frames += [resize_frame(im, tuple(image_size)).numpy() for im in imgs]
        labels.append(state[:, cols])
        eps += [store.key(i)] * len(idx)
    return np.stack(frames), np.concatenate(labels), np.asarray(eps)


def probe_checkpoint(model, frames, labels, episodes, layer: int, test_fraction: float = 0.3,
                     alpha: float = 1.0) -> dict:
    """R^2 of a linear probe per target (hand, object, goal) and their mean over object and goal
    (what the policy cannot read from proprioception)."""
    test_ids = []
    by_task: dict = {}
    for key in dict.fromkeys(episodes):
        by_task.setdefault(str(key).split("/")[0], []).append(key)
    for task, ids in by_task.items():  # the last episodes of every task: both sides hold every task
        n_test = max(1, int(round(len(ids) * test_fraction)))
        if len(ids) - n_test < 1:
            raise ValueError(f"the probe needs at least 2 held-out episodes per task (fit and test), {task} has {len(ids)}")
        test_ids += ids[-n_test:]
    test = np.isin(episodes, test_ids)
    feats = backbone_features(model, frames, layer)
    r2 = ridge_probe(feats[~test], labels[~test], feats[test], labels[test], alpha)["r2"]
    out, k = {}, 0
    for name, sl in PROBE_TARGETS.items():
        n = sl.stop - sl.start
        out[f"probe_r2_{name}"] = float(np.mean(r2[k:k + n]))
        k += n
    out["probe_r2"] = (out["probe_r2_object"] + out["probe_r2_goal"]) / 2
    return out


def _blur(z: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the H and W axes of [..., H, W, C] (edges mirrored), so frames,
    batch and channels stay apart."""
    r = int(3.5 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (-3, -2):
        n = z.shape[axis]
        pad = [(0, 0)] * z.ndim
        pad[axis] = (r, r)
        zp = np.pad(z, pad, mode="symmetric")
        z = sum(w * np.take(zp, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return z


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean structural similarity of uint8 images [..., H, W, 3] (Gaussian window, per channel)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = a.astype(np.float64), b.astype(np.float64)
    f = lambda z: _blur(z, sigma)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(m.mean())


def rollout_quality(ckpt, store, episodes, chunks: int = 2, steps: int = 10, device: str = "cpu") -> dict:
    """World-model rollouts of a fine-tuned checkpoint from each episode's first frame with the
    recorded actions given: mean PSNR and SSIM against the recording."""
    from .data import ActionNormalizer
    from .models import load_checkpoint_model
    from .predict import psnr, rollout
    from .train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(ckpt)
    model, config = load_checkpoint_model(ckpt, device)
    norm = ckpt / "normalization.json"
    normalizer = ActionNormalizer.load(norm) if norm.is_file() else None
    p, s = [], []
    for i, ep in enumerate(episodes):
        pred, real = rollout(model, config["io"], normalizer, store, int(ep), 0, chunks, steps, seed=i)
        p.append(psnr(pred, real))
        s.append(ssim(pred, real))
    return {"rollout_psnr": float(np.mean(p)), "rollout_ssim": float(np.mean(s))}
