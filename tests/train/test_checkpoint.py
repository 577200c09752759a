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


_KILL_IN_SAVE = """
import sys
import jax.numpy as jnp
from nemotron_jax.train.checkpoint import Checkpointer
ck = Checkpointer(sys.argv[1], every=1, debug_kill_in_save_at_step=2)
ck.save(1, {"w": jnp.ones(3)}, {"pos": 1})
ck.save(2, {"w": jnp.full(3, 2.0)}, {"pos": 2})
print("not killed")
"""


def test_kill_inside_save_keeps_the_previous_step_and_the_leftover_is_removed(tmp_path):
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, str(tmp_path / "ck")], capture_output=True, text=True,
                       cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), timeout=300)
    assert r.returncode == -9 and "not killed" not in r.stdout, r.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert left[0] == "1" and left[1].startswith("2.") and len(left) == 2, left  # step 2 only as a temporary dir
    ck = Checkpointer(tmp_path / "ck", every=1)
    assert ck.steps() == [1]
    step, state, data, _ = ck.restore_latest({"w": jnp.zeros(3)})
    assert step == 1 and data == {"pos": 1} and float(state["w"][0]) == 1.0
    ck.close()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]  # orbax removed the leftover (in background)


def test_check_meta_refuses_before_reading_arrays_and_sets_nothing_aside(tmp_path):
    ck = Checkpointer(tmp_path / "ck", every=1)
    ck.save(1, _state(1.0), {}, extra={"model_config": {"hidden_size": 64}})
    seen = []

    def check(step, meta):
        seen.append((step, meta["model_config"]["hidden_size"]))
        raise CheckpointMismatchError("another model")

    with pytest.raises(CheckpointMismatchError, match="another model"):
        ck.restore_latest({"params": {"w": jnp.zeros((5, 5))}}, check_meta=check)  # would fail to restore
    assert seen == [(1, 64)] and ck.steps() == [1] and not (tmp_path / "ck.corrupt").exists()
    ck.close()
