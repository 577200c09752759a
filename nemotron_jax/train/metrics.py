"""Training metrics: the CSV log (and TensorBoard when tensorboardX is installed), the events log and the loss
plot.

metrics.csv column `skipped_steps`: how many steps of the run so far were skipped for a non-finite loss or
gradient (cumulative, carried across resumes); it is written on every logged row and on every skipped step's row.
`events.jsonl` (`EventLog`): one JSON object per line for what is not a per-step number: a skipped step, a stop
after too many consecutive skips, a schedule change accepted on resume. It is append-only history (not truncated
on resume).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import time

METRIC_FIELDS = ("step", "loss", "loss_main", "aux_loss", "loss_mtp_1", "loss_mtp_2", "grad_norm", "lr",
                 "tokens_per_s", "expert_max_over_mean", "val_loss", "nvfp4_ftz_fraction", "skipped_steps")


class EventLog:
    """Append-only JSON lines: {"time": unix seconds, "step": s, "event": name, ...}."""

    def __init__(self, path: pathlib.Path, *, write: bool = True):
        self.path = path
        self.write_files = write

    def write(self, *, step: int, event: str, **fields) -> None:
        if not self.write_files:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(dict(time=round(time.time(), 3), step=int(step), event=event, **fields), default=str)
                    + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def baseline_comparison(val_loss: float, baseline: float) -> str:
    """'0.1234 better than' / 'worse than' / 'equal to' the baseline (lower loss is better)."""
    if not (math.isfinite(val_loss) and math.isfinite(baseline)):
        return "not comparable with"
    gap = baseline - val_loss
    if gap == 0:
        return "equal to"
    return f"{abs(gap):.4f} {'better' if gap > 0 else 'worse'} than"


class MetricsLog:
    """CSV metrics (truncated to the resumed step, so a resumed run's file reads like an uninterrupted one)."""

    def __init__(self, path: pathlib.Path, resume_step: int, *, write: bool = True):
        """`write=False` (the other processes of a multi-process run) keeps the rows in memory only."""
        self.path = path
        self.write_files = write
        rows = []
        if path.exists() and resume_step > 0:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.rows = rows
        self.tb = None
        if not write:
            return
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in METRIC_FIELDS}
        self.rows.append(row)
        if not self.write_files:
            return
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
    # A bare Figure (no pyplot): draws without a display and leaves the process's matplotlib backend alone, so
    # a notebook that calls the trainer keeps showing its own figures inline.
    from matplotlib.figure import Figure  # noqa: PLC0415

    tr = [(int(r["step"]), float(r["loss_main"])) for r in rows if r.get("loss_main") not in ("", None)]
    va = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in ("", None)]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
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
