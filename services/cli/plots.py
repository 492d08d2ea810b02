"""Plots of a job's step metrics: one PNG per metric plus an overview of reward, KL and loss.

Pure: series in, files out (matplotlib's Agg backend, no display). `tlm jobs plot` and the
demo read the series over the trainer API and call `write_plots`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tlm.trainer.v1 import trainer_pb2 as pb

Series = dict[str, list[tuple[int, float]]]  # metric -> [(step, value)] in step order
# The overview's panels: a title and the metric names it reads, first present wins
# (`reward_mean` today; `reward` is TRL's name).
OVERVIEW: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward_mean", "reward")),
    ("KL", ("kl",)),
    ("loss", ("loss",)),
)


def metric_series(events: Iterable[pb.JobEvent]) -> Series:
    """Every metrics event's values by name, one point per step (a repeated step, from a
    resumed job, keeps its last value).

    >>> e = [pb.JobEvent(metrics=pb.StepMetrics(step=s, values={"loss": 1 / s})) for s in (1, 2)]
    >>> metric_series(e)
    {'loss': [(1, 1.0), (2, 0.5)]}
    """
    points: dict[str, dict[int, float]] = {}
    for event in events:
        if event.WhichOneof("event") != "metrics":
            continue
        for name, value in event.metrics.values.items():
            points.setdefault(name, {})[event.metrics.step] = value
    return {name: sorted(by_step.items()) for name, by_step in sorted(points.items())}


def main_metric(values: Mapping[str, object], names: Sequence[str]) -> str | None:
    """The first of `names` that `values` (a series, or one step's values) has."""
    return next((name for name in names if name in values), None)


def file_name(metric: str) -> str:
    """A metric name as a file name: `rewards/math/mean` -> `rewards_math_mean.png`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric) + ".png"


def write_plots(series: Series, out_dir: Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """`overview.png` (reward, KL and loss, those present) and one PNG per metric of `metrics`
    (default: every metric present). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    panels = [(title, name) for title, names in OVERVIEW if (name := main_metric(series, names))]
    if panels:
        paths.append(_overview(series, panels, out_dir / "overview.png"))
    for name in metrics if metrics is not None else list(series):
        paths.append(_single(series, name, out_dir / file_name(name)))
    return paths


def _overview(series: Series, panels: list[tuple[str, str]], path: Path) -> Path:
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for ax, (title, name) in zip(axes[:, 0], panels, strict=True):
        _draw(ax, series, name)
        ax.set_title(title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _single(series: Series, name: str, path: Path) -> Path:
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    _draw(ax, series, name)
    ax.set_title(name)
    ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw(ax: object, series: Series, name: str) -> None:
    """A line over steps; `x_mean` (`rewards/s/mean`) gets a band of +- `x_std` when logged."""
    steps = [s for s, _ in series.get(name, [])]
    values = [v for _, v in series.get(name, [])]
    ax.plot(steps, values, marker="o" if len(steps) < 50 else None, markersize=3)  # type: ignore[attr-defined]
    std = dict(series.get(name.removesuffix("mean") + "std", []))
    if name.endswith("mean") and std and all(s in std for s in steps):
        low = [v - std[s] for s, v in zip(steps, values, strict=True)]
        high = [v + std[s] for s, v in zip(steps, values, strict=True)]
        ax.fill_between(steps, low, high, alpha=0.2)  # type: ignore[attr-defined]
    ax.grid(True, alpha=0.3)  # type: ignore[attr-defined]
