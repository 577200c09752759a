"""Training metrics: the CSV log (and TensorBoard when tensorboardX is installed) and the loss plot."""

from __future__ import annotations

import csv
import pathlib

METRIC_FIELDS = ("step", "loss", "loss_main", "aux_loss", "loss_mtp_1", "loss_mtp_2", "grad_norm", "lr",
                 "tokens_per_s", "expert_max_over_mean", "val_loss", "nvfp4_ftz_fraction")


class MetricsLog:
    """CSV metrics (truncated to the resumed step, so a resumed run's file reads like an uninterrupted one)."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.rows = rows
        self.tb = None
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in METRIC_FIELDS}
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v != "":
                    self.tb.add_scalar(k, float(v), int(row["step"]))

    def close(self):
        if self.tb is not None:
            self.tb.close()


def plot_losses(rows: list[dict], baseline: float, path: pathlib.Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tr = [(int(r["step"]), float(r["loss_main"])) for r in rows if r.get("loss_main") not in ("", None)]
    va = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in ("", None)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train (next-token CE)", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=1.5)
    ax.axhline(baseline, color="gray", ls="--", label=f"unigram baseline {baseline:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
