"""lit_posttrain.plotting draws exactly what a CSVLogger run logged, and names what it cannot find."""

import csv

import pytest
from lightning.pytorch.loggers import CSVLogger

from lit_posttrain.plotting import find_metrics_csv, plot_metrics, read_metrics, smooth


@pytest.fixture
def run(tmp_path):
    """A CSVLogger run as the Trainer writes it: sparse rows, train metrics every step, val every 2 steps."""
    logger = CSVLogger(tmp_path / "logs")
    for step in range(6):
        logger.log_metrics({"train/reward": 0.1 * step**2, "train/kl": 0.01 * step, "epoch": 0}, step=step)
        if step % 2 == 1:
            logger.log_metrics({"val/reward": 1.0 - 0.5 ** step, "epoch": 0}, step=step)
    logger.save()
    return tmp_path / "logs", logger.log_dir


def _csv_column(path, name):
    with open(path, newline="") as f:
        return [(int(float(r["step"])), float(r[name])) for r in csv.DictReader(f) if r[name] != ""]


def test_plotted_values_equal_the_csv(run):
    """Each panel's line holds the CSV's (step, value) pairs of its metric, and nothing from other rows."""
    save_dir, version_dir = run
    fig = plot_metrics(version_dir, ["train/reward", "train/kl", "val/reward"])
    assert [ax.get_title() for ax in fig.axes[:3]] == ["train/reward", "train/kl", "val/reward"]
    for ax, name in zip(fig.axes, ["train/reward", "train/kl", "val/reward"]):
        x, y = ax.lines[0].get_data()
        expected = _csv_column(find_metrics_csv(version_dir), name)
        assert list(zip(map(int, x), map(float, y))) == expected  # the same numbers, read from the same text
    # val/reward was logged at steps 1, 3, 5 only: the sparse rows of the train metrics are skipped
    assert [int(s) for s in fig.axes[2].lines[0].get_xdata()] == [1, 3, 5]


def test_accepts_the_file_the_version_dir_and_a_dir_above(run):
    """metrics.csv, its version directory and the logger's save_dir all name the same run."""
    save_dir, version_dir = run
    path = find_metrics_csv(version_dir)
    assert path.name == "metrics.csv"
    assert find_metrics_csv(path) == path == find_metrics_csv(save_dir)
    assert read_metrics(save_dir) == read_metrics(path)


def test_a_missing_metric_is_named_with_the_logged_ones(run):
    """A metric the run never logged raises a KeyError naming it and listing every logged metric."""
    with pytest.raises(KeyError) as error:
        plot_metrics(run[1], ["train/reward", "train/rewards"])
    message = str(error.value)
    assert "'train/rewards'" in message
    assert "train/kl, train/reward, val/reward" in message


def test_a_directory_without_metrics_is_an_error(tmp_path):
    """A directory with no metrics.csv below it says so, and suggests the CSVLogger."""
    with pytest.raises(FileNotFoundError, match="no metrics.csv below it.*CSVLogger"):
        plot_metrics(tmp_path, ["train/loss"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        plot_metrics(tmp_path / "nope", ["train/loss"])


def test_smoothing_keeps_the_raw_curve_and_adds_the_debiased_average(run):
    """With smoothing, the raw curve stays (first line) and the second is the debiased EMA of it."""
    fig = plot_metrics(run[1], ["train/kl"], smoothing=0.5)
    raw, smoothed = fig.axes[0].lines
    # EMA with debiasing, by hand for the first three values 0, 0.01, 0.02 and weight 0.5:
    # a1 = 0.5*0 = 0 / 0.5 = 0; a2 = (0.5*0 + 0.5*0.01) / 0.75 = 0.00667; a3 = (0.5*0.005 + 0.5*0.02) / 0.875 = 0.01429
    assert list(raw.get_ydata()[:3]) == pytest.approx([0.0, 0.01, 0.02])
    assert list(smoothed.get_ydata()[:3]) == pytest.approx([0.0, 0.01 / 1.5, 0.0125 / 0.875])
    assert smooth([1.0, 2.0], 0.0) == [1.0, 2.0]
    with pytest.raises(ValueError, match="smoothing must be in"):
        plot_metrics(run[1], ["train/kl"], smoothing=1.0)
