"""Reliability diagrams: what they draw (accuracy per bin, the counts underneath, sparse bins faint and off
the overlay's line), checked on matplotlib's artists, and that every caller draws them that way."""

import json

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from timm_cskd import compare, reliability
from timm_cskd import study as st

# Bin 0 empty, bin 1 one image (wrong: accuracy 0), bins 2 and 3 hundreds; 4 equal-width bins.
BINS = {
    "count": [0.0, 1.0, 200.0, 300.0],
    "conf_sum": [0.0, 0.4, 130.0, 255.0],
    "correct_sum": [0.0, 0.0, 110.0, 240.0],
}


def bars(ax):
    """(x centre, bottom, height, alpha) of each bar the axes hold, in drawing order."""
    return [
        (p.get_x() + p.get_width() / 2, p.get_y(), p.get_height(), p.get_alpha() or 1.0)
        for p in ax.patches
        if isinstance(p, Rectangle)
    ]


def test_curve_against_the_bins():
    curve = reliability.reliability_curve(BINS, min_count=10)
    np.testing.assert_allclose(curve.centres, [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(curve.accuracy, [0, 0, 110 / 200, 240 / 300])
    np.testing.assert_allclose(curve.confidence, [0, 0.4, 130 / 200, 255 / 300])
    assert curve.filled.tolist() == [False, True, True, True]
    assert curve.reliable.tolist() == [False, False, True, True]
    assert curve.sparse.tolist() == [False, True, False, False]
    assert curve.ece == pytest.approx((0.4 + 20 + 15) / 501)
    # With no minimum every filled bin is drawn in full; an empty one is still no point at (0, 0).
    assert reliability.reliability_curve(BINS, min_count=0).reliable.tolist() == [False, True, True, True]


def test_single_diagram_draws_accuracy_over_counts_with_sparse_bins_faint():
    fig, curve = reliability.reliability_figure(BINS, title="run", min_count=10)
    acc_ax, hist_ax = fig.axes
    assert acc_ax.get_position().y0 > hist_ax.get_position().y1, "the histogram sits under the accuracy"
    drawn = bars(acc_ax)
    # Per drawn group (reliable, then sparse): accuracy bars, then the gap bars on top of them.
    accuracy = [(x, h, a) for x, bottom, h, a in drawn if bottom == 0]
    assert accuracy[:2] == [(0.625, pytest.approx(0.55), 1.0), (0.875, pytest.approx(0.8), 1.0)]
    assert accuracy[2] == (0.375, 0.0, reliability.FAINT), "the one-image bin is drawn faint"
    assert not any(x == 0.125 for x, *_ in drawn), "the empty bin is not drawn"
    gaps = {x: (bottom, h) for x, bottom, h, _ in drawn if bottom > 0}
    assert gaps[0.625] == (pytest.approx(0.55), pytest.approx(0.075))
    counts = [(x, h, a) for x, _, h, a in bars(hist_ax)]
    assert counts == [(0.625, 200.0, 1.0), (0.875, 300.0, 1.0), (0.375, 1.0, reliability.FAINT)]
    assert hist_ax.get_yscale() == "log"
    lines = {line.get_label(): line.get_data() for line in hist_ax.lines}
    assert lines["10 images"][1][0] == 10, "the minimum count is marked"
    assert lines["accuracy"][0][0] == pytest.approx(350 / 501)
    assert lines["mean confidence"][0][0] == pytest.approx(385.4 / 501)
    assert f"ECE = {100 * curve.ece:.2f}%" in acc_ax.get_title()


def test_overlay_line_skips_sparse_bins():
    other = {
        "count": [50.0, 50.0, 0.0, 400.0],
        "conf_sum": [5.0, 20.0, 0.0, 380.0],
        "correct_sum": [10, 20, 0, 360],
    }
    fig, curves = reliability.reliability_overlay_figure({"CE": BINS, "CS-KD": other}, min_count=10)
    acc_ax, hist_ax = fig.axes
    lines = [line for line in acc_ax.lines if line.get_label() != "perfect calibration"]
    solid = {line.get_label(): line for line in lines if (line.get_alpha() or 1.0) == 1.0}
    faint = [line for line in lines if line.get_alpha() == reliability.FAINT]
    ce = solid["CE (ECE 7.07%)"]
    # The one-image bin's accuracy of 0 is off CE's line, drawn alone and faint.
    np.testing.assert_allclose(ce.get_xdata(), [130 / 200, 255 / 300])
    np.testing.assert_allclose(ce.get_ydata(), [0.55, 0.8])
    assert ce.get_linestyle() == "-"
    np.testing.assert_allclose(faint[0].get_xdata(), [0.4])
    np.testing.assert_allclose(faint[0].get_ydata(), [0.0])
    assert faint[0].get_linestyle() == "None"
    np.testing.assert_allclose(solid["CS-KD (ECE 5.00%)"].get_ydata(), [0.2, 0.4, 0.9])
    # Underneath, each run's counts per bin (empty bins not drawn).
    stairs = [p for p in hist_ax.patches if not isinstance(p, Rectangle)]
    assert len(stairs) == 2
    values = [np.asarray(s.get_data().values) for s in stairs]
    np.testing.assert_array_equal(values[0], [np.nan, 1, 200, 300])
    np.testing.assert_array_equal(values[1], [50, 50, np.nan, 400])
    assert curves["CE"].sparse.tolist() == [False, True, False, False]


@pytest.fixture
def captured(monkeypatch):
    """The curves every overlay and single diagram draws, whoever calls them."""
    drawn = {"overlay": [], "single": []}
    overlay, single = reliability.reliability_overlay_figure, reliability.reliability_figure

    def record_overlay(runs, min_count=reliability.MIN_COUNT, **kwargs):
        fig, curves = overlay(runs, min_count, **kwargs)
        drawn["overlay"].append((fig, curves))
        return fig, curves

    def record_single(bins, title=None, min_count=reliability.MIN_COUNT):
        fig, curve = single(bins, title, min_count)
        drawn["single"].append((fig, curve))
        return fig, curve

    monkeypatch.setattr(reliability, "reliability_overlay_figure", record_overlay)
    monkeypatch.setattr(reliability, "reliability_figure", record_single)
    return drawn


def test_compare_draws_the_counted_overlay(tmp_path, captured, capsys):
    for name in ("ce", "cskd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"top1_err": 1.0, "ece": 2.0}))
        (tmp_path / name / "reliability.json").write_text(json.dumps(BINS))
    out = tmp_path / "overlay.png"
    assert compare.main([str(tmp_path / "ce"), str(tmp_path / "cskd"), "--output", str(out)]) == 0
    assert out.is_file()
    [(fig, curves)] = captured["overlay"]
    assert list(curves) == ["ce", "cskd"] and curves["ce"].sparse.tolist() == [False, True, False, False]
    assert len(fig.axes) == 2, "accuracy and counts"


def test_study_overlay_pools_seed_counts(tmp_path, captured):
    from test_study_analysis import known_rows, synthetic_study

    study = synthetic_study(tmp_path, known_rows())  # each cell's bins: counts (0, 5, 20)
    st.summarise(study)
    [(fig, curves)] = captured["overlay"]
    # Three seeds pooled: 15 images in the middle bin, over the minimum though each seed holds 5.
    assert curves["CE"].count.tolist() == [0, 15, 60] and curves["CE"].reliable.tolist() == [
        False,
        True,
        True,
    ]
    assert (study.output / "reliability_fm.png").is_file()


def test_figures_draw_each_run_and_the_overlay_with_counts(tmp_path, captured, monkeypatch):
    from test_figures import synthetic, write_run

    from timm_cskd import figures

    # Figure 3's t-SNE is not what this test is about: its first two feature dimensions stand in.
    monkeypatch.setattr(figures, "tsne_embedding", lambda features, labels, *args: (features[:, :2], labels))

    runs = {
        name: write_run(tmp_path / name, *synthetic(sharpness=sharpness, seed=i))
        for i, (name, sharpness) in enumerate((("CE", 4.0), ("CS-KD", 1.5)))
    }
    figures.figures_for_runs(runs, tmp_path / "figures", tsne_per_class=10)
    bins = {name: json.loads((folder / "reliability.json").read_text()) for name, folder in runs.items()}
    assert [curve.count.tolist() for _, curve in captured["single"]] == [
        bins["CE"]["count"],
        bins["CS-KD"]["count"],
    ]
    [(_, curves)] = captured["overlay"]
    assert {name: c.count.tolist() for name, c in curves.items()} == {n: b["count"] for n, b in bins.items()}
    assert (tmp_path / "figures" / "fig5_overlay.png").is_file()
