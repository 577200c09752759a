"""orbax checkpoints of the train state: round trip, newest-good fallback with the bad step set aside, refusals."""

import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.train.checkpoint import CheckpointMismatchError, Checkpointer


def _state(v: float):
    return {"params": {"w": jnp.full((3, 2), v), "b": jnp.arange(4.0) + v}, "step": jnp.int32(v)}


def test_round_trip_keeps_every_leaf_and_the_data_state(tmp_path):
    ck = Checkpointer(tmp_path / "ck", every=2, keep=3)
    assert ck.restore_latest(_state(0.0)) is None  # nothing saved yet: start afresh
    assert ck.should_save(4) and not ck.should_save(3)
    ck.save(2, _state(2.0), {"pos": 7}, extra={"note": "x"})
    ck.save(4, _state(4.0), {"pos": 9})
    step, state, data, meta = ck.restore_latest(_state(0.0))
    assert step == 4 and data == {"pos": 9} and meta["step"] == 4
    np.testing.assert_array_equal(state["params"]["b"], np.arange(4.0) + 4.0)
    assert int(state["step"]) == 4
    ck.close()


def test_corrupt_newest_falls_back_and_is_set_aside(tmp_path):
    ck = Checkpointer(tmp_path / "ck", every=1)
    ck.save(1, _state(1.0), {})
    ck.save(2, _state(2.0), {})
    for f in (tmp_path / "ck" / "2").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    step, state, _, _ = ck.restore_latest(_state(0.0))
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0
    assert [p.name.split("-")[0] for p in (tmp_path / "ck.corrupt").iterdir()] == ["2"]
    assert ck.steps() == [1]
    ck.close()


def test_another_model_is_refused_not_restarted(tmp_path):
    ck = Checkpointer(tmp_path / "ck", every=1)
    ck.save(1, _state(1.0), {})
    other = {"params": {"w": jnp.zeros((3, 2)), "extra": jnp.zeros(2)}, "step": jnp.int32(0)}
    with pytest.raises((CheckpointMismatchError, RuntimeError)):
        ck.restore_latest(other)
    ck.close()
