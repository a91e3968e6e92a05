"""Studies: a grid of tiny real runs summarised as the paper's tables; skip, resume, failures, plans."""

import csv
import json
import re
import shlex
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import make_image_folder, make_tiny_dataset
from PIL import Image

from timm_cskd import study as st
from timm_cskd import study_report
from timm_cskd.study import (
    StudyError,
    check_study,
    claim_cell,
    parse_method_spec,
    plan_study,
    run_cell,
    run_study,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]
# demo.yaml's recipe shrunk to seconds; a constant learning rate, so a cell resumed with more epochs
# follows the schedule an uninterrupted run would.
TINY = [
    "--model", "test_resnet", "--img-size", "32", "-b", "8", "--lr", "0.05", "-j", "0", "--epochs", "2",
    "--sched", "multistep", "--log-interval", "2",
]  # fmt: skip
EVAL = ["-j", "0", "-b", "64"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_dataset(root)
    make_image_folder(root / "calib", [3] * 4, size=(24, 20), colours=COLOURS, noise=90)
    return root


def grid(tmp_path, data_dir, **overrides):
    kwargs = {
        "output": tmp_path / "study",
        "datasets": {"tiny": data_dir},
        "methods": ["ce", {"name": "cskd", "label": "CS-KD"}],
        "seeds": [0, 1],
        "base_config": DEMO,
        "trainer_args": TINY,
        "eval_args": EVAL,
        "calib_split": "calib",
    }
    return plan_study(**{**kwargs, **overrides})


# ---------------------------------------------------------------------------------------------- plans


def test_method_kwargs_parsing(tmp_path, data_dir):
    assert parse_method_spec("cskd:temperature=1,lambda=2") == ("cskd", {"temperature": 1, "lambda": 2})
    assert parse_method_spec("cskd-e:auto_augment=augmix-m5-w3") == (
        "cskd-e",
        {"auto_augment": "augmix-m5-w3"},
    )
    assert parse_method_spec("ce") == ("ce", {})
    study = grid(tmp_path, data_dir, methods=["ce", "cskd:temperature=1,lambda=2"], seeds=[3])
    ce, cskd = study.rows
    assert (ce.label, ce.method, ce.kwargs) == ("ce", "ce", {})
    assert cskd.label == "cskd (temperature=1, lambda=2)"
    assert cskd.kwargs == {"temperature": 1.0, "lambda": 2.0}
    command = study.cells[1].train_command()
    i = command.index("--method-kwargs")
    assert command[i - 2 : i + 3] == ["--method", "cskd", "--method-kwargs", "temperature=1.0", "lambda=2.0"]
    assert command[command.index("--seed") + 1] == "3" and command[-2:] == ["--resume", "auto"]
    assert "--method-kwargs" not in study.cells[0].train_command()

    with pytest.raises(
        StudyError, match=r"methods entry 2 'cskd:temprature=1'.*no hyper-parameter 'temprature'"
    ):
        grid(tmp_path, data_dir, methods=["ce", "cskd:temprature=1"])
    with pytest.raises(StudyError, match="unknown --method 'nosuch'"):
        grid(tmp_path, data_dir, methods=["nosuch"])
    with pytest.raises(StudyError, match="expected METHOD"):
        parse_method_spec("cskd:temperature")


def test_sweep_expands_to_labelled_cells(tmp_path, data_dir, monkeypatch):
    sweep = {"method": "cskd", "temperature": [1, 4], "lambda": [1, 2, 3, 4]}
    study = grid(tmp_path, data_dir, methods=["ce"], sweep=sweep, seeds=[0, 1])
    expected = [(t, lam) for t in (1, 4) for lam in (1, 2, 3, 4)]
    assert [r.label for r in study.rows] == ["ce"] + [
        f"cskd (temperature={t}, lambda={lam})" for t, lam in expected
    ]
    assert [r.kwargs for r in study.rows[1:]] == [
        {"temperature": float(t), "lambda": float(lam)} for t, lam in expected
    ]
    assert len(study.cells) == 9 * 2 and len({c.dir for c in study.cells}) == 18
    assert study.cells[1].dir == tmp_path / "study" / "tiny" / "cskd_temperature=1_lambda=1" / "seed0"
    assert [(c.row.label, c.seed) for c in study.cells[8:10]] == [(study.rows[-1].label, 0), ("ce", 1)]

    # The same sweep from the command line and from a grid file.
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump({"methods": ["ce"], "sweep": [sweep], "seeds": [0, 1]}, sort_keys=False)
    )
    planned = []
    monkeypatch.setattr(st.cli, "print_plan", lambda study, overwrite=False: planned.append(study))
    for source in (["--sweep", "cskd", "temperature=1,4", "lambda=1,2,3,4"], ["--grid", str(grid_file)]):
        argv = ["--data-dir", f"tiny={data_dir}", "--output", str(tmp_path / "study"), "-c", str(DEMO)]
        assert (
            st.main([*argv, "--methods", "ce", "--seeds", "0", "1", *source, "--dry-run", "--", *TINY]) == 0
        )
        assert [r.label for r in planned.pop().rows] == [r.label for r in study.rows]

    with pytest.raises(StudyError, match="share a folder name"):
        grid(tmp_path, data_dir, methods=["cskd:temperature=1,lambda=1"], sweep=sweep)


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path, data_dir, capsys):
    bare = tmp_path / "bare"  # a dataset without the calib split: evaluated without temperature scaling
    make_image_folder(bare / "train", [2, 2], size=(8, 8))
    out = tmp_path / "study"
    argv = [
        "-c", str(DEMO), "--data-dir", str(data_dir), str(bare), "--methods", "ce", "cskd:lambda=2",
        "--seeds", "0", "1", "--output", str(out), "--calib-split", "calib", "--eval-args", "-j 0",
        "--dry-run", "--", *TINY,
    ]  # fmt: skip
    assert st.main(argv) == 0
    printed = capsys.readouterr().out
    assert not out.exists(), "a dry run writes nothing"
    study = grid(
        tmp_path, data_dir, datasets=[data_dir, bare], methods=["ce", "cskd:lambda=2"], eval_args=["-j", "0"]
    )
    assert len(study.cells) == 8
    for cell in study.cells:
        assert f"train: {shlex.join(cell.train_command())}" in printed
        assert f"eval:  {shlex.join(cell.eval_command())}" in printed
        assert ("--calib-split" in cell.eval_command()) == (cell.dataset == data_dir.name)
    assert "note: dataset 'bare' has no 'calib' split" in printed
    # demo.yaml selects CS-KD with --cskd-* keys: each cell's method replaces them, and their values
    # become the defaults of the rows whose method has those hyper-parameters.
    config = study.cells[0].settings["trainer_config"]
    assert config["model"] == "resnet18" and not {"cskd_mode", "cskd_temperature", "experiment"} & set(config)
    assert study.rows[1].kwargs == {"temperature": 4.0, "lambda": 2.0}


def test_bad_grids_name_the_culprit(tmp_path, data_dir):
    with pytest.raises(StudyError, match="--seed, which the study sets per cell"):
        grid(tmp_path, data_dir, trainer_args=[*TINY, "--seed", "42"])
    with pytest.raises(StudyError, match="unknown arguments --epoch-count"):
        grid(tmp_path, data_dir, trainer_args=["--epoch-count", "3"])
    with pytest.raises(StudyError, match="--output, which the study sets per cell"):
        grid(tmp_path, data_dir, eval_args=["--output", "x"])
    with pytest.raises(StudyError, match="data dir .*nothere does not exist"):
        grid(tmp_path, data_dir, datasets=[tmp_path / "nothere"])
    bad = tmp_path / "grid.yaml"
    bad.write_text("seed: [0, 1]\n")
    with pytest.raises(StudyError, match=r"grid.yaml: unknown key 'seed'; did you mean 'seeds'"):
        st.load_grid(bad)


def test_changed_settings_are_refused_and_a_held_cell_is_busy(tmp_path, data_dir, capsys):
    study = grid(tmp_path, data_dir, methods=["ce"], seeds=[0])
    cell = study.cells[0]
    with claim_cell(cell) as record:
        assert record["status"] == "running"
        assert json.loads((cell.dir / "cell.json").read_text())["settings"] == cell.settings
        # This process holds the cell: a study reaching it reports it in use, naming the holder.
        result = run_cell(cell)
        assert result.status == "busy" and "in use by another run" in result.message
    assert (cell.dir / "trainer.yaml").is_file() and not cell.train_dir.exists()
    assert check_study(study) == {cell: "partial"}

    changed = grid(tmp_path, data_dir, methods=["ce"], seeds=[0], trainer_args=[*TINY, "--epochs", "3"])
    with pytest.raises(StudyError, match=r"(?s)tiny / ce / seed 0 .*trainer_args.*pass --overwrite"):
        check_study(changed)
    argv = ["-c", str(DEMO), "--data-dir", f"tiny={data_dir}", "--methods", "ce", "--seeds", "0"]
    argv += [
        "--output",
        str(tmp_path / "study"),
        "--calib-split",
        "calib",
        "--eval-args",
        "-j 0 -b 64",
        "--dry-run",
    ]
    assert st.main([*argv, "--", *TINY, "--epochs", "3"]) == 2
    assert "were run with other settings" in capsys.readouterr().err
    assert st.main([*argv, "--overwrite", "--", *TINY, "--epochs", "3"]) == 0
    assert f"train: {shlex.join(changed.cells[0].train_command(fresh=True))}" in capsys.readouterr().out
    assert changed.cells[0].train_command(fresh=True)[-1] == "--overwrite"


def test_table_mean_std_relative_change_and_bold():
    keys = ("top1_err", "top5_err", "ece", "nll", "recall_at_1", "conf_gap")
    runs = {
        "CE": [dict(zip(keys, (10.0, 2.0, 5.0, 0.55, 80.0, -3.0)))],
        "CS-KD": [
            dict(zip(keys, (8.0, 3.0, 2.0, 0.4, 82.0, 4.0))),
            dict(zip(keys, (9.0, 3.0, 3.0, 0.6, 84.0, 3.0))),
        ],
    }
    lines = st.dataset_table([("CE", runs["CE"]), ("CS-KD", runs["CS-KD"])]).splitlines()
    assert "ECE, TS" not in lines[0], "temperature-scaled columns only when some run has them"
    # The confidence gap's best is the one closest to 0: CE's -3.00 beats CS-KD's +3.50.
    assert lines[2] == "| CE | 10.00 | **2.00** | 5.00 | 0.550 | 80.00 | **-3.00** | 1 |"
    # CS-KD: top-1 mean 8.5 with sample std 0.71 (ddof=1), -15.0% of CE's 10.
    assert lines[3] == (
        "| CS-KD | **8.50 ± 0.71** (-15.0%) | 3.00 ± 0.00 | **2.50 ± 0.71** | **0.500 ± 0.141** | **83.00 ± 1.41** "
        "| +3.50 ± 0.71 | 2 |"
    )


# ---------------------------------------------------------------------------------------------- runs


def _table_rows(markdown: str, dataset: str) -> dict[str, dict[str, str]]:
    """study.md's table of ``dataset``: row label -> column header -> cell text."""
    lines = markdown.split(f"## {dataset}\n", 1)[1].strip().split("\n\n")[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


@pytest.mark.slow
def test_grid_end_to_end_resume_skip_and_failure(tmp_path, data_dir, capsys):
    from timm_cskd.train import main as train_main

    # Passes the plan (a valid count) but not the trainer: test_resnet has too few stages for 50 heads.
    broken = {"name": "byot", "label": "broken", "kwargs": {"heads": 50}}
    study = grid(
        tmp_path, data_dir, methods=[broken, "ce", {"name": "cskd", "label": "CS-KD"}], baseline="ce"
    )
    out = study.output
    # An interrupted cell: its own trainer command stopped after 1 of its 2 epochs.
    partial = next(c for c in study.cells if c.row.label == "ce" and c.seed == 1)
    with claim_cell(partial):
        assert train_main([*partial.trainer_arguments(), "--epochs", "1"]) == 0
    first_epoch = (partial.train_dir / "summary.csv").read_text().splitlines()[1]
    assert not (partial.eval_dir / "metrics.json").exists()

    report = run_study(study)
    printed = capsys.readouterr().out
    statuses = {(c.row.label, c.seed): r.status for c, r in report.results.items()}
    assert statuses == {
        ("broken", 0): "failed",
        ("broken", 1): "failed",
        **{(m, s): "done" for m in ("ce", "CS-KD") for s in (0, 1)},
    }
    assert report.exit_code == 1
    assert "[4/6] tiny / CS-KD / seed 1: done" in printed and "ETA" in printed
    failed = next(c for c in study.cells if c.row.label == "broken")
    record = json.loads((failed.dir / "cell.json").read_text())
    assert record["status"] == "failed" and record["stage"] == "train" and record["exit_code"] != 0
    assert any("--method byot heads=50: the model has" in line for line in record["log_tail"])
    assert (
        f"train failed with exit code {record['exit_code']}" in printed
        and "| error: --method byot heads=50" in printed
    )

    # The interrupted cell resumed from its checkpoint: its first epoch was not trained again.
    train_log = (partial.dir / "train.log").read_text()
    assert "--resume auto" in train_log and "resumed from" in train_log and "at epoch 1, batch 0" in train_log
    summary_rows = (partial.train_dir / "summary.csv").read_text().splitlines()
    assert len(summary_rows) == 3 and summary_rows[1] == first_epoch

    # study.json, study.csv and study.md against each run's metrics.json.
    listed = json.loads((out / "study.json").read_text())
    assert {(c["dataset"], c["method"], c["seed"]) for c in listed["cells"]} == {
        ("tiny", m, s) for m in ("ce", "CS-KD") for s in (0, 1)
    }
    metrics = {}
    for entry in listed["cells"]:
        metrics[entry["method"], entry["seed"]] = json.loads(
            (out / entry["eval_dir"] / "metrics.json").read_text()
        )
    assert {(e["method"], e["status"]) for e in listed["incomplete"]} == {("broken", "failed")}
    assert all("ece_ts" in m for m in metrics.values()), "evaluated with --calib-split calib"

    row_methods = {"ce": "ce", "CS-KD": "cskd"}
    with open(out / "study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Every metric of every cell, and not evaluate's settings (ece_bins: how ECE was measured).
    assert len(rows) == sum(
        len(
            [
                k
                for k, v in m.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "ece_bins"
            ]
        )
        for m in metrics.values()
    )
    assert "ece_bins" not in {row["metric"] for row in rows}
    for row in rows:
        assert float(row["value"]) == metrics[row["label"], int(row["seed"])][row["metric"]]
        assert row["dataset"] == "tiny" and row["method"] == row_methods[row["label"]]

    # results.csv: timm validate.py's columns, a row per evaluated cell, in timm's units.
    with open(out / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    assert {(r["label"], int(r["seed"])) for r in results} == set(metrics)
    for r in results:
        m = metrics[r["label"], int(r["seed"])]
        assert (
            r["model"] == "test_resnet" and r["dataset"] == "tiny" and r["method"] == row_methods[r["label"]]
        )
        assert float(r["top1"]) == round(100 - m["top1_err"], 4) and float(r["top5_err"]) == round(
            m["top5_err"], 4
        )
        assert float(r["param_count"]) == round(m["evaluated"]["param_count"] / 1e6, 2) > 0
        assert float(r["ece_ts"]) == m["ece_ts"] and int(r["img_size"]) == m["evaluated"]["img_size"]

    table = _table_rows((out / "study.md").read_text(), "tiny")
    columns = {
        "top1_err": ("Top-1 err (%) ↓", "{:.2f}", min), "top5_err": ("Top-5 err (%) ↓", "{:.2f}", min),
        "ece": ("ECE (%) ↓", "{:.2f}", min), "nll": ("NLL ↓", "{:.3f}", min), "recall_at_1": ("R@1 (%) ↑", "{:.2f}", max),
        "conf_gap": ("Conf. gap (%)", "{:+.2f}", None), "ece_ts": ("ECE, TS (%) ↓", "{:.2f}", min),
        "nll_ts": ("NLL, TS ↓", "{:.3f}", min),
    }  # fmt: skip
    assert set(table) == {"ce", "CS-KD"}
    for key, (header, fmt, pick) in columns.items():
        values = {m: [metrics[m, s][key] for s in (0, 1)] for m in ("ce", "CS-KD")}
        shown = {m: float(fmt.format(statistics.mean(v))) for m, v in values.items()}
        best = pick(shown.values()) if pick else min(shown.values(), key=abs)
        for method, v in values.items():
            text = f"{fmt.format(statistics.mean(v))} ± {fmt.replace('+', '').format(statistics.stdev(v))}"
            cell = table[method][header]
            bold = (abs(shown[method]) == abs(best)) if pick is None else shown[method] == best
            assert cell.startswith(f"**{text}**" if bold else text), (key, method, cell)
    ce_top1, cskd_top1 = (statistics.mean(metrics[m, s]["top1_err"] for s in (0, 1)) for m in ("ce", "CS-KD"))
    if ce_top1:
        assert table["CS-KD"]["Top-1 err (%) ↓"].endswith(f"({100 * (cskd_top1 - ce_top1) / ce_top1:+.1f}%)")
    assert re.fullmatch(r"[0-9.* ±]+", table["ce"]["Top-1 err (%) ↓"]), "no relative change on the CE row"
    assert table["ce"]["Seeds"] == table["CS-KD"]["Seeds"] == "2"
    with Image.open(out / "reliability_tiny.png") as img:
        assert img.size[0] > 100
    markdown = (out / "study.md").read_text()
    assert "![reliability diagram, tiny](reliability_tiny.png)" in markdown
    # The analysis against the baseline ce, as study_report regenerates it from the folder.
    assert "Differences from the baseline ce: each method's mean minus ce's" in markdown
    assert "| CS-KD | " in markdown.split("Differences from the baseline ce")[1]
    assert "The baseline ce is " in markdown
    assert study_report.report(out).strip() in markdown

    # Rerunning the finished grid trains and evaluates nothing; the broken row left out, it exits 0.
    done = [c for c in study.cells if c.row.label != "broken"]
    stamps = {
        p: p.stat().st_mtime_ns
        for c in done
        for p in (c.dir / "cell.json", c.dir / "train.log", c.dir / "eval.log")
    }
    again = grid(tmp_path, data_dir, methods=["ce", {"name": "cskd", "label": "CS-KD"}])
    report = run_study(again)
    assert report.exit_code == 0 and {r.status for r in report.results.values()} == {"skipped"}
    assert "4 done, 0 to run" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert "broken" not in (out / "study.md").read_text()
