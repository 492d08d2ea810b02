"""Plots of job metrics, pure: events -> series -> PNG files."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from services.cli.plots import file_name, metric_series, write_plots
from tlm.trainer.v1 import trainer_pb2 as pb


def metrics(step: int, **values: float) -> pb.JobEvent:
    return pb.JobEvent(metrics=pb.StepMetrics(step=step, values=values))


def test_series_by_metric_in_step_order_last_value_wins() -> None:
    """A resumed job logs the steps after its checkpoint again: the later value is kept;
    events that are not metrics are skipped."""
    events = [
        metrics(2, loss=0.5, kl=0.1),
        pb.JobEvent(log=pb.LogLine(level="info", message="resumed")),
        metrics(1, loss=1.0),
        metrics(2, loss=0.4),
    ]
    assert metric_series(events) == {"kl": [(2, 0.1)], "loss": [(1, 1.0), (2, 0.4)]}


def test_file_names_are_safe() -> None:
    assert file_name("rewards/math/mean") == "rewards_math_mean.png"
    assert file_name("../x y") == ".._x_y.png"  # no separator survives: stays in the folder


def test_overview_and_one_png_per_metric(tmp_path: Path) -> None:
    """TRL's `reward` name works as well as ours; a std logged on some steps only draws no
    band (and does not fail); a metric without a reward, KL or loss gets no overview."""
    series = {
        "reward": [(1, 0.1), (2, 0.9)],
        "rewards/digit/mean": [(1, 0.1), (2, 0.9)],
        "rewards/digit/std": [(2, 0.1)],
        "kl": [(1, 0.0), (2, 0.2)],
    }
    paths = write_plots(series, tmp_path / "out")
    assert [p.name for p in paths] == [
        "overview.png",
        "reward.png",
        "rewards_digit_mean.png",
        "rewards_digit_std.png",
        "kl.png",
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 0
    assert write_plots({"grad_norm": [(1, 2.0)]}, tmp_path / "g") == [tmp_path / "g/grad_norm.png"]
