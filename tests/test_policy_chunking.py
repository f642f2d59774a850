"""Chunk execution queue, receding horizon and temporal ensembling against hand values."""
import math

import numpy as np
import pytest

from selfflow_robot.policies.chunking import ActionChunker, ChunkConfig


def _chunk(base, h=3):
    return np.array([[base + i] for i in range(h)], np.float32)  # [H, 1]: base, base+1, ...


def _run(cfg, steps, h=3):
    """Feed chunk 10*t at every query step t; return executed actions and query steps."""
    c, out, queries = ActionChunker(cfg), [], []
    for t in range(steps):
        if c.needs_chunk():
            c.push(_chunk(10 * t, h))
            queries.append(t)
        out.append(float(c.pop()[0]))
    return out, queries


def test_full_chunk_execution_queries_every_h_steps():
    out, q = _run(ChunkConfig(), 7)
    assert q == [0, 3, 6] and out == [0, 1, 2, 30, 31, 32, 60]


def test_receding_horizon_executes_k_then_replans():
    out, q = _run(ChunkConfig(execute_steps=2), 6)
    assert q == [0, 2, 4] and out == [0, 1, 20, 21, 40, 41]


def test_execute_steps_larger_than_chunk_is_capped():
    out, q = _run(ChunkConfig(execute_steps=10), 4)
    assert q == [0, 3] and out == [0, 1, 2, 30]


def test_temporal_ensemble_hand_values():
    k = 0.5
    out, q = _run(ChunkConfig(ensemble=True, ensemble_k=k), 4)
    assert q == [0, 1, 2, 3]
    e1, e2 = math.exp(-k), math.exp(-2 * k)
    # step 1: chunk@0 predicts 1 (oldest, weight 1), chunk@1 predicts 10 (weight e^-k)
    # step 2: chunk@0 -> 2, chunk@1 -> 11, chunk@2 -> 20; step 3: chunk@1 -> 12, @2 -> 21, @3 -> 30
    expected = [0.0, (1 + 10 * e1) / (1 + e1), (2 + 11 * e1 + 20 * e2) / (1 + e1 + e2),
                (12 + 21 * e1 + 30 * e2) / (1 + e1 + e2)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_negative_k_favours_newest():
    out, _ = _run(ChunkConfig(ensemble=True, ensemble_k=-50.0), 3)
    np.testing.assert_allclose(out, [0, 10, 20], atol=1e-6)


def test_ensemble_horizon_limits_voters():
    out, _ = _run(ChunkConfig(ensemble=True, ensemble_k=0.0, ensemble_horizon=2), 3)
    np.testing.assert_allclose(out, [0, (1 + 10) / 2, (11 + 20) / 2])


def test_ensemble_with_execute_steps_two():
    out, q = _run(ChunkConfig(ensemble=True, ensemble_k=0.0, execute_steps=2), 4)
    assert q == [0, 2]
    np.testing.assert_allclose(out, [0, 1, (2 + 20) / 2, 21])


def test_reset_and_errors():
    c = ActionChunker(ChunkConfig())
    with pytest.raises(RuntimeError, match="push"):
        c.pop()
    c.push(_chunk(0))
    assert c.queued == 3 and not c.needs_chunk()
    c.pop()
    assert c.queued == 2
    c.reset()
    assert c.needs_chunk() and c.queued == 0
    with pytest.raises(ValueError):
        c.push(np.zeros(3))
    c.push(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="action dimension"):
        c.push(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        ChunkConfig(execute_steps=0)


@pytest.mark.parametrize("kw, field", [
    (dict(ensemble_k="x"), "ensemble_k"), (dict(ensemble_k=float("nan")), "ensemble_k"),
    (dict(execute_steps=2.5), "execute_steps"), (dict(execute_steps="2"), "execute_steps"),
    (dict(ensemble_horizon=1.5), "ensemble_horizon"), (dict(ensemble="no"), "ensemble")])
def test_config_types_are_checked_at_construction(kw, field):
    """ensemble_k='x' failed only at the first act(); execute_steps=2.5 was truncated to 2."""
    with pytest.raises(ValueError, match=f"chunk.{field} "):
        ChunkConfig(**kw)
    assert ChunkConfig(execute_steps=np.int64(2), ensemble_k=1).execute_steps == 2
