"""The metrics CSV (a resumed run's file reads like an uninterrupted one) and the loss plot."""

import csv

from nemotron_jax.train.metrics import METRIC_FIELDS, MetricsLog, plot_losses


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_resume_truncates_to_the_restored_step(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path, 0)
    for s in range(1, 6):
        log.write({"step": s, "loss": 5.0 - s, "loss_main": 5.0 - s})
    log.close()
    log = MetricsLog(path, 3)  # resumed from the step-3 checkpoint: steps 4, 5 are redone
    log.write({"step": 4, "loss": 0.5, "loss_main": 0.5, "val_loss": 0.7})
    log.close()
    rows = _rows(path)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and rows[-1]["loss"] == "0.5"
    assert list(rows[0]) == list(METRIC_FIELDS)
    plot_losses(rows, 3.3, tmp_path / "loss.png", "t")
    assert (tmp_path / "loss.png").stat().st_size > 1000
