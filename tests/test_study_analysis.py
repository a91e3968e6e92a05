"""A study reads its own table: Welch's t against scipy, the differences table, the regime paragraph, and
study_report regenerating study.md's analysis from a study folder."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from timm_cskd import study as st
from timm_cskd import study_report
from timm_cskd.study.regime import regime_paragraph
from timm_cskd.study.stats import t_critical, t_two_sided_p, welch
from timm_cskd.study.tables import COLUMNS, dataset_table, differences_legend, differences_table

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("df", [1.0, 1.37, 2.0, 3.2, 4.0, 7.5, 30.0, 1e4])
def test_t_distribution_against_scipy(df):
    assert t_critical(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    assert t_critical(df, alpha=0.01) == pytest.approx(stats.t.ppf(0.995, df), rel=1e-9)
    for t in (0.0, 0.3, 1.0, 2.5, 8.0, 60.0):
        assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("sizes", [(2, 2), (3, 3), (3, 5), (10, 4)])
def test_welch_against_scipy_ttest_ind(sizes):
    rng = np.random.default_rng(sum(sizes))
    a, b = rng.normal(1.0, 0.5, sizes[0]), rng.normal(0.0, 2.0, sizes[1])
    expected = stats.ttest_ind(a, b, equal_var=False)
    result = welch(a, b)
    assert result.difference == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert result.t == pytest.approx(expected.statistic, rel=1e-10)
    assert result.df == pytest.approx(expected.df, rel=1e-10)
    assert result.p == pytest.approx(expected.pvalue, rel=1e-8)
    assert result.significant == (expected.pvalue < 0.05)
    # One seed on a side, or no spread on either: no t.
    assert welch(a[:1], b).t is None and welch(a[:1], b).why_not == "one seed"
    assert welch([2.0, 2.0], [1.0, 1.0]).why_not == "no seed spread"


def seeds(**columns):
    """Runs (one metrics dict per seed) from per-metric lists of seed values."""
    n = len(next(iter(columns.values())))
    return [{k: float(v[i]) for k, v in columns.items()} for i in range(n)]


def known_rows():
    """CE over-confident; CS-KD flips the gap and is better on NLL and top-5 beyond seed noise.

    CE's top-5 (1, 2, 3) against CS-KD's (4, 5, 6): difference 3, t = 3 / sqrt(1/3 + 1/3) = 3.674 with
    4 df (two-sided 5% critical value 2.776): significant. Top-1 (10, 11, 12) against (10.5, 11.5, 14.5):
    difference 1.17, sample std 2.08, t = 1.167 / sqrt(1/3 + 4.333/3) = 0.875: not significant.
    """
    ce = seeds(
        top1_err=[10, 11, 12], top5_err=[4, 5, 6], ece=[3.1, 3.2, 3.3], nll=[0.50, 0.52, 0.54],
        recall_at_1=[80, 81, 82], conf_gap=[2.9, 3.0, 3.1], ece_ts=[1.0, 1.1, 1.2], nll_ts=[0.40, 0.41, 0.42],
    )  # fmt: skip
    cskd = seeds(
        top1_err=[10.5, 11.5, 14.5], top5_err=[1, 2, 3], ece=[9.7, 9.8, 9.9], nll=[0.30, 0.31, 0.32],
        recall_at_1=[80, 81, 82], conf_gap=[-10.1, -10.0, -9.9], ece_ts=[2.0, 2.5, 3.0], nll_ts=[0.40, 0.42, 0.44],
    )  # fmt: skip
    ls = seeds(
        top1_err=[10, 11, 12], top5_err=[4, 5, 6], ece=[1.9, 2.0, 2.1], nll=[0.50, 0.52, 0.54],
        recall_at_1=[80, 81, 82], conf_gap=[1.0, 1.5, 2.0], ece_ts=[1.0, 1.1, 1.2], nll_ts=[0.40, 0.41, 0.42],
    )  # fmt: skip
    return [("CE", ce), ("CS-KD", cskd), ("LS", ls)]


def table_cells(table: str) -> dict[str, dict[str, str]]:
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def test_differences_table_has_known_t_and_marks_significance():
    rows = known_rows()
    cells = table_cells(differences_table(rows))
    assert set(cells) == {"CS-KD", "LS"}, "no row for the baseline"
    assert cells["CS-KD"]["Top-5 err (%) ↓"] == f"**-3.00 (t {-3 / math.sqrt(2 / 3):+.1f}, 4.0 df)**"
    s_cskd = np.std([10.5, 11.5, 14.5], ddof=1)
    se = math.sqrt(1 / 3 + s_cskd**2 / 3)
    df = se**4 / ((1 / 3) ** 2 / 2 + (s_cskd**2 / 3) ** 2 / 2)
    assert cells["CS-KD"]["Top-1 err (%) ↓"] == f"+1.17 (t {(7 / 6) / se:+.1f}, {df:.1f} df)", (
        "not bold: |t| < 2.9"
    )
    assert cells["CS-KD"]["NLL ↓"].startswith("**-0.210 (t")
    assert cells["LS"]["Top-1 err (%) ↓"] == "+0.00 (t +0.0, 4.0 df)"
    # Every entry against scipy: difference, t, df, and bold exactly where p < 0.05.
    for label, runs in rows[1:]:
        for key, _, fmt, _ in COLUMNS:
            header = next(h for k, h, _, _ in COLUMNS if k == key)
            a, b = [m[key] for m in runs], [m[key] for m in rows[0][1]]
            ref = stats.ttest_ind(a, b, equal_var=False)
            text = cells[label][header]
            numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", text)]
            assert numbers[0] == pytest.approx(np.mean(a) - np.mean(b), abs=10 ** -int(fmt[-3]))
            assert numbers[1] == pytest.approx(ref.statistic, abs=0.05) and numbers[2] == pytest.approx(
                ref.df, abs=0.05
            )
            assert text.startswith("**") == (ref.pvalue < 0.05), (label, key, text, ref.pvalue)
    assert "Welch's t" in differences_legend(rows) and "5% critical value" in differences_legend(rows)


def test_one_seed_says_no_significance_can_be_read():
    rows = [(label, runs[:1]) for label, runs in known_rows()]
    assert "With one seed no significance can be read" in differences_legend(rows)
    cells = table_cells(differences_table(rows))
    assert cells["CS-KD"]["Top-5 err (%) ↓"] == "-3.00", "a difference alone, no t"
    text = regime_paragraph(rows, calib_split="calib")
    assert "With one seed no method can be told from CE beyond seed noise." in text
    assert "Better than" not in text and "Worse than" not in text


def numbers_in(text: str) -> list[str]:
    return re.findall(r"[-+]?\d+\.\d+", text)


def assert_traceable(paragraph: str, rows):
    """Every number the paragraph states is shown in the dataset's tables."""
    shown = dataset_table(rows) + differences_table(rows)
    for number in numbers_in(paragraph):
        assert re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", shown), number


def test_regime_over_confident_baseline():
    rows = known_rows()
    text = regime_paragraph(rows, calib_split="calib")
    assert text.startswith(
        "The baseline CE is over-confident: confidence gap +3.00 and ECE 3.20 (1.10 after temperature "
        "scaling fitted on the `calib` split)."
    )
    assert (
        "CS-KD (-10.00) flips the sign of the gap: under-confident where CE is over-confident, so its ECE "
        "(9.80) measures miscalibration in the opposite direction to CE's." in text
    )
    assert "LS (" not in text.split("flips")[0], "LS keeps the gap's sign"
    # LS's lower ECE (2.00 vs 3.20, t -14.7) is beyond seed noise too.
    assert (
        "Better than CE beyond seed noise (bold differences): CS-KD on top-5 error and NLL; LS on ECE."
        in text
    )
    assert "Worse than CE beyond seed noise: CS-KD on ECE and ECE after TS." in text
    assert "No method's top-1 error differs from CE's beyond seed noise." in text
    assert (
        "Temperature scaling alone takes CE's ECE from 3.20 to 1.10, at or below the lowest ECE another "
        "method reaches without it (LS, 2.00)." in text
    )
    assert "After temperature scaling no method's ECE is below CE's beyond seed noise." in text
    assert_traceable(text, rows)


def test_regime_under_confident_baseline_and_named_baseline():
    rows = known_rows()
    # CS-KD as the baseline: under-confident; CE and LS flip to over-confidence.
    text = regime_paragraph(rows, baseline="CS-KD")
    assert text.startswith(
        "The baseline CS-KD is under-confident: confidence gap -10.00 and ECE 9.80 (2.50 after"
    )
    assert (
        "CE (+3.00) and LS (+1.50) flip the sign of the gap: over-confident where CS-KD is under-confident, "
        "so their ECE (CE 3.20 and LS 2.00) measures miscalibration" in text
    )
    assert (
        "takes CS-KD's ECE from 9.80 to 2.50, above the lowest ECE another method reaches without it (LS, 2.00)"
        in text
    )
    assert "After temperature scaling CE and LS have a lower ECE than CS-KD beyond seed noise." in text
    assert_traceable(text, rows)
    table = table_cells(dataset_table(rows, baseline="CS-KD"))
    assert table["CE"]["Top-1 err (%) ↓"].endswith(f"({100 * (11 - 12.1666667) / 12.1666667:+.1f}%)")
    assert re.fullmatch(r"[0-9.* ±]+", table["CS-KD"]["Top-1 err (%) ↓"]), "no change on the baseline row"


def test_regime_unsettled_gap_and_no_calibration_split():
    rows = [
        (label, [{k: v for k, v in m.items() if not k.endswith("_ts")} for m in runs])
        for label, runs in known_rows()
    ]
    rows[0] = ("CE", [dict(m, conf_gap=g) for m, g in zip(rows[0][1], (-0.5, 0.25, 0.75))])
    text = regime_paragraph(rows, calib_split="calib")
    assert text.startswith(
        "The baseline CE is neither clearly over- nor under-confident: its confidence gap +0.17 ± 0.63 lies "
        "within its seed spread of 0; ECE 3.20."
    )
    assert "flip" not in text, "no sign to flip"
    assert "No temperature was fitted (no `calib` split)" in text


# ---------------------------------------------------------------------------------------------- a study


def synthetic_study(tmp_path, rows, baseline=None):
    """A planned study whose cells hold the given metrics as if evaluated (no training)."""
    data = tmp_path / "data"
    (data / "calib").mkdir(parents=True)
    methods = [
        {"name": {"CE": "ce", "CS-KD": "cskd", "LS": "ls"}[label], "label": label} for label, _ in rows
    ]
    study = st.plan_study(
        tmp_path / "study",
        {"fm": data},
        methods,
        seeds=[0, 1, 2],
        calib_split="calib",
        baseline=baseline,
    )
    by_label = dict(rows)
    bins = {"count": [0, 5, 20], "conf_sum": [0, 2.0, 17.0], "correct_sum": [0, 2, 16]}
    for cell in study.cells:
        cell.eval_dir.mkdir(parents=True)
        (cell.eval_dir / "metrics.json").write_text(json.dumps(by_label[cell.row.label][cell.seed]))
        (cell.eval_dir / "reliability.json").write_text(json.dumps(bins))
        (cell.dir / "cell.json").write_text(json.dumps({"settings": cell.settings, "status": "done"}))
    return study


def test_study_md_carries_the_analysis_and_study_report_regenerates_it(tmp_path, capsys):
    rows = known_rows()
    study = synthetic_study(tmp_path, rows)
    assert study.baseline == "CE"
    st.summarise(study)
    markdown = (study.output / "study.md").read_text()
    section = markdown.split("## fm\n\n", 1)[1]
    assert section.startswith(dataset_table(rows) + "\n\n" + differences_legend(rows) + "\n\n")
    assert differences_table(rows) in section
    assert regime_paragraph(rows, calib_split="calib") in section
    assert "**-3.00 (t -3.7, 4.0 df)**" in section
    assert json.loads((study.output / "study.json").read_text())["baseline"] == "CE"

    # From the folder alone (the data and cells gone), the same analysis.
    for cell in study.cells:
        (cell.eval_dir / "metrics.json").unlink()
    assert study_report.main([str(study.output)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("## fm\n\n")
    assert printed.split("## fm\n\n")[1].strip() == section.split("\n\n![reliability")[0].strip()
    out = tmp_path / "analysis.md"
    assert study_report.main([str(study.output), "--baseline", "CS-KD", "--output", str(out)]) == 0
    assert "The baseline CS-KD is under-confident" in out.read_text()
    assert study_report.main([str(study.output), "--baseline", "nosuch"]) == 2
    assert "--baseline 'nosuch' is no row of the study (rows: CE, CS-KD, LS)" in capsys.readouterr().err
    assert study_report.main([str(tmp_path / "missing")]) == 2
    assert "study.csv" in capsys.readouterr().err


def test_results_csv_is_timms_results_table_with_a_row_per_cell(tmp_path):
    """The cells' metrics.json as timm validate.py's results: accuracies in percent from our errors,
    param_count in millions; a cell evaluated without temperature scaling leaves those columns empty."""
    rows = known_rows()
    rows[2][1][0].pop("ece_ts")
    for _, runs in rows:
        for m in runs:
            m["evaluated"] = {"model": "resnet50", "param_count": 25_557_032, "img_size": 224,
                              "crop_pct": 0.95, "interpolation": "bicubic"}  # fmt: skip
    study = synthetic_study(tmp_path, rows)
    st.summarise(study)
    with open(study.output / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames[:13] == ["dataset", "label", "method", "seed", "model", "top1", "top1_err", "top5",
                                      "top5_err", "param_count", "img_size", "crop_pct", "interpolation"]  # fmt: skip
    assert len(table) == 9
    expected = {(label, seed): m for label, runs in rows for seed, m in enumerate(runs)}
    for r in table:
        m = expected[r["label"], int(r["seed"])]
        assert r["dataset"] == "fm" and r["method"] == {"CE": "ce", "CS-KD": "cskd", "LS": "ls"}[r["label"]]
        assert float(r["top1"]) == round(100 - m["top1_err"], 4) and float(r["top1_err"]) == m["top1_err"]
        assert float(r["top5"]) == round(100 - m["top5_err"], 4)
        assert (r["model"], r["param_count"], r["img_size"]) == ("resnet50", "25.56", "224")
        assert (r["crop_pct"], r["interpolation"]) == ("0.95", "bicubic")
        assert r["ece_ts"] == ("" if (r["label"], r["seed"]) == ("LS", "0") else str(m["ece_ts"]))
        assert float(r["recall_at_1"]) == m["recall_at_1"] and float(r["conf_gap"]) == m["conf_gap"]


def test_baseline_flag_and_grid_key(tmp_path):
    rows = known_rows()
    study = synthetic_study(tmp_path, rows, baseline="cskd")  # a method name with a single row
    assert study.baseline == "CS-KD"
    st.summarise(study)
    markdown = (study.output / "study.md").read_text()
    assert "relative change of its mean against the baseline's, CS-KD" in markdown
    assert "The baseline CS-KD is under-confident" in markdown
    assert "| CS-KD |" not in markdown.split("Differences from the baseline")[1].split("The baseline")[0]
    with pytest.raises(
        st.StudyError, match=r"--baseline 'nosuch' is not one row's label; rows: CE, CS-KD, LS"
    ):
        synthetic_study(tmp_path / "again", rows, baseline="nosuch")
    grid = tmp_path / "grid.yaml"
    grid.write_text("baseline: LS\n")
    assert st.load_grid(grid) == {"baseline": "LS"}


def test_regime_with_no_difference_beyond_seed_noise():
    ce = known_rows()[0][1]
    rows = [("CE", ce), ("MaxEnt", [dict(m, ece=m["ece"] + d) for m, d in zip(ce, (0.3, -0.2, 0.1))])]
    text = regime_paragraph(rows, calib_split="calib")
    assert "No method flips the sign of CE's confidence gap." in text
    assert "No method is better or worse than CE beyond seed noise on any metric." in text
    assert "Better than" not in text and "top-1" not in text
    assert_traceable(text, rows)


def test_regime_names_why_no_t_exists():
    """Identical seeds have no spread to test against: the paragraph says so, not 'one seed'."""
    ce, cskd = known_rows()[0][1][:1] * 3, known_rows()[1][1][:1] * 3
    rows = [("CE", ce), ("CS-KD", cskd)]
    assert "(no seed spread)" in differences_table(rows)
    text = regime_paragraph(rows, calib_split="calib")
    assert "With no spread over seeds no method can be told from CE beyond seed noise." in text
    assert "one seed" not in text


def test_a_gap_sign_inside_seed_noise_or_rounding_is_no_flip():
    ce = [dict(m, conf_gap=g) for m, g in zip(known_rows()[0][1], (1.9, 2.0, 2.1))]
    noisy = [dict(m, conf_gap=g) for m, g in zip(known_rows()[2][1], (-2.5, 1.8, 0.4))]  # -0.10 ± 2.17
    rows = [("CE", ce), ("LS", noisy)]
    text = regime_paragraph(rows, calib_split="calib")
    assert "No method flips the sign of CE's confidence gap beyond seed noise." in text
    spread = np.std([-2.5, 1.8, 0.4], ddof=1)
    assert (
        f"The gap of LS (-0.10 ± {spread:.2f}) has the opposite sign to CE's but lies within its seed "
        "spread of 0." in text
    )
    assert_traceable(text, rows)
    # A baseline gap that rounds to 0.00 is no regime, and a method's that rounds to -0.00 no flip.
    tiny = [("CE", [dict(m, conf_gap=0.004) for m in ce]), ("LS", [dict(m, conf_gap=-0.003) for m in noisy])]
    text = regime_paragraph(tiny, calib_split="calib")
    assert text.startswith("The baseline CE is neither clearly over- nor under-confident")
    assert "flip" not in text


def test_a_one_seed_row_is_not_counted_among_the_tested():
    ce, ls = known_rows()[0][1], known_rows()[2][1]
    maxent = [dict(m, ece=m["ece"] + d) for m, d in zip(ce, (0.3, -0.2, 0.1))]
    single = [dict(ce[0], top1_err=5.0)]
    rows = [("CE", ce), ("MaxEnt", maxent), ("BYOT", single)]
    text = regime_paragraph(rows, calib_split="calib")
    assert "No tested method is better or worse than CE beyond seed noise on any metric." in text
    assert "BYOT has no t against CE (one seed): no significance is read for it." in text
    legend = differences_legend(rows)
    assert "A row with one seed shows its difference alone." in legend
    assert "not corrected for the number of entries" in legend and "one entry in 20" in legend
    text = regime_paragraph([*rows[:1], ("LS", ls), rows[2]], calib_split="calib")
    assert "Better than CE beyond seed noise (bold differences): LS on ECE." in text
    assert "BYOT on" not in text and "BYOT has no t against CE (one seed)" in text


def test_only_the_baseline_and_empty_rows():
    ce = known_rows()[0][1]
    assert differences_legend([("CE", ce)]) == (
        "Only the baseline CE has evaluated runs on this dataset: no differences."
    )
    assert differences_table([("CE", ce)]) == ""
    table = table_cells(dataset_table([("CE", ce), ("LS", [])]))
    assert set(table["LS"].values()) == {"LS", "-", "0"}, "a row with no evaluated run shows dashes"
    # A baseline top-1 error of 0 has no relative change to show.
    zero = [dict(m, top1_err=0.0) for m in ce]
    assert table_cells(dataset_table([("CE", zero), ("LS", known_rows()[2][1])]))["LS"][
        "Top-1 err (%) ↓"
    ] == ("11.00 ± 1.00")


def test_a_non_finite_metric_reports_instead_of_crashing(tmp_path, capsys):
    """A diverged cell's NaN NLL (study.csv stores repr(nan)) marks its entries and reads no t."""
    rows = known_rows()
    rows[1][1][0]["nll"] = float("nan")
    study = synthetic_study(tmp_path, rows)
    st.summarise(study)
    assert study_report.main([str(study.output)]) == 0
    printed = capsys.readouterr().out
    cells = table_cells(printed.split("\n\n")[3])
    assert cells["CS-KD"]["NLL ↓"] == "+nan (not finite)"
    assert cells["LS"]["NLL ↓"].startswith("+0.000 (t"), "the other rows keep their tests"
    table = table_cells(printed.split("\n\n")[1])
    assert table["CS-KD"]["NLL ↓"] == "nan ± nan" and table["LS"]["NLL ↓"].startswith("**"), (
        "a NaN mean is never the best"
    )
    rows[0][1][1]["conf_gap"] = float("inf")
    assert (
        regime_paragraph(rows)
        == "No regime can be read: the baseline CE's confidence gap is not a finite number."
    )


def test_results_md_analysis_follows_from_its_own_table():
    """RESULTS.md's Fashion-MNIST section is the tool's output: rebuilding three seeds per cell from its
    table (mean - std, mean, mean + std keep the mean, the std and so Welch's t up to rounding), the tool
    writes the section's legend and paragraph word for word, and marks the same differences bold."""
    section = (
        (REPO / "benchmarks" / "RESULTS.md")
        .read_text()
        .split("## CPU study: every method on Fashion-MNIST")[1]
    )
    blocks = section.split("\n\n")
    table = next(b for b in blocks if b.startswith("| Method | Top-1 err"))
    keys = [k for k, _, _, _ in COLUMNS]
    rows = []
    for label, cells in table_cells(table).items():
        runs = [{}, {}, {}]
        for key, header in zip(keys, (h for k, h, _, _ in COLUMNS)):
            mean, std = (float(x) for x in numbers_in(cells[header])[:2])
            for run, offset in zip(runs, (-std, 0.0, std)):
                run[key] = mean + offset
        rows.append((label, runs))
    assert differences_legend(rows) in blocks
    assert regime_paragraph(rows, calib_split="calib") in blocks
    printed = table_cells(next(b for b in blocks if b.startswith("| Method |") and "(t " in b))
    for label, cells in table_cells(differences_table(rows)).items():
        assert {h: c.startswith("**") for h, c in cells.items()} == {
            h: c.startswith("**") for h, c in printed[label].items()
        }, label
