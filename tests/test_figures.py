"""figures: the numbers behind Figures 1(b) and 2 against direct numpy loops, PNGs, the study layout."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from timm_cskd import figures
from timm_cskd.metrics import ClassificationMeter
from timm_cskd.reliability import bins_to_dict


def synthetic(n=60, c=6, dim=8, sharpness=3.0, seed=0):
    """Clustered features (one centre per class) and probabilities that err on about a third."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % c
    logits = rng.normal(0, 1, (n, c)) * sharpness
    logits[np.arange(n), labels] += rng.normal(1.5, 1.0, n) * sharpness
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    features = rng.normal(0, 10, (c, dim))[labels] + rng.normal(0, 0.5, (n, dim))
    return probs.astype(np.float32), labels, features.astype(np.float32)


def write_run(folder, probs, labels, features):
    folder.mkdir(parents=True)
    np.savez_compressed(folder / "predictions.npz", probs=probs, labels=labels, features=features)
    meter = ClassificationMeter()
    meter.update(torch.log(torch.from_numpy(probs)), torch.from_numpy(labels))
    (folder / "reliability.json").write_text(json.dumps(bins_to_dict(*meter.bins())))
    return folder


def check_png(path, min_size=(600, 400)):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], (path, img.size)
        assert img.info["dpi"][0] >= 150


@pytest.mark.parametrize("c", [6, 3])
def test_top5_scores_against_a_loop(c):
    probs, labels, _ = synthetic(c=c)
    rows = [sorted(p.tolist(), reverse=True)[:5] for p, y in zip(probs, labels) if int(np.argmax(p)) != y]
    assert 0 < len(rows) < len(labels)
    np.testing.assert_allclose(figures.top5_scores(probs, labels), np.mean(rows, axis=0), rtol=1e-6)
    assert len(figures.top5_scores(probs, labels)) == min(5, c)


def test_logprob_histograms_against_a_loop():
    runs = {f"m{s}": figures.Predictions(*synthetic(sharpness=s, seed=s)) for s in (1, 4)}
    got = figures.logprob_histograms(runs, bins=12)
    expected = {}
    for name, run in runs.items():
        predicted, truth = [], []
        for p, y in zip(run.probs.astype(np.float64), run.labels):
            if int(np.argmax(p)) != y:
                predicted.append(np.log(p.max()))
                truth.append(np.log(p[y]))
        expected[name] = {"predicted": predicted, "ground_truth": truth}
    for panel in ("predicted", "ground_truth"):
        edges = got[panel]["edges"]
        everything = np.concatenate([expected[name][panel] for name in runs])
        assert len(edges) == 13
        assert edges[0] == pytest.approx(everything.min()) and edges[-1] == pytest.approx(everything.max())
        for name in runs:
            counts = got[panel]["counts"][name]
            np.testing.assert_array_equal(counts, np.histogram(expected[name][panel], bins=edges)[0])
            assert counts.sum() == len(expected[name][panel])
    values = figures.misclassified_log_probs(runs["m1"].probs, runs["m1"].labels)
    np.testing.assert_allclose(values[0], expected["m1"]["predicted"], rtol=1e-12)
    np.testing.assert_allclose(values[1], expected["m1"]["ground_truth"], rtol=1e-12)


def test_tsne_embedding_is_seeded_and_keeps_clusters():
    _, labels, features = synthetic(n=60, c=6)
    points, chosen = figures.tsne_embedding(features, labels, [1, 3, 4], per_class=8, seed=3)
    assert points.shape == (24, 2)
    assert sorted(np.unique(chosen).tolist()) == [1, 3, 4] and (np.bincount(chosen)[[1, 3, 4]] == 8).all()
    again, _ = figures.tsne_embedding(features, labels, [1, 3, 4], per_class=8, seed=3)
    np.testing.assert_array_equal(points, again)
    # Well-separated classes stay separated: every point's nearest embedded neighbour shares its class.
    distance = ((points[:, None] - points[None]) ** 2).sum(2)
    np.fill_diagonal(distance, np.inf)
    assert (chosen[distance.argmin(1)] == chosen).all()


def test_cli_writes_every_figure(tmp_path, capsys):
    ce = write_run(tmp_path / "ce" / "eval-val", *synthetic(sharpness=4, seed=1))
    cskd = write_run(tmp_path / "cskd" / "eval-val", *synthetic(sharpness=1.5, seed=2))
    out = tmp_path / "figs"
    assert figures.main([str(ce), str(cskd), "--names", "CE", "CS-KD", "--output", str(out), "--tsne-classes", "0", "1", "2"]) == 0  # fmt: skip
    names = ["fig1b.png", "fig2_CS-KD.png", "fig3.png", "fig5_CE.png", "fig5_CS-KD.png", "fig5_overlay.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert capsys.readouterr().out.split() == [str(out / name) for name in names]
    for name in names:
        check_png(out / name, min_size=(600, 600) if name.startswith("fig5") else (600, 400))
    # Default names are the run folders, as timm_cskd.compare names them; Figure 2 sets the first run
    # against each other one.
    ls = write_run(tmp_path / "ls" / "eval-val", *synthetic(sharpness=2, seed=3))
    default = tmp_path / "default"
    assert figures.main([str(ce), str(cskd), str(ls), "--output", str(default), "--tsne-per-class", "5"]) == 0
    assert (default / "fig5_cskd.png").is_file()
    assert sorted(p.name for p in default.glob("fig2*")) == ["fig2_cskd.png", "fig2_ls.png"]


def test_study_folder(tmp_path, capsys):
    study = tmp_path / "study"
    cells = []
    for dataset in ("cub", "dogs"):
        for method, sharpness in (("ce", 4), ("cskd", 1.5)):
            for seed in (1, 0, 2):
                eval_dir = f"{dataset}/{method}/seed{seed}/eval-val"
                if seed == 0:
                    write_run(study / eval_dir, *synthetic(sharpness=sharpness, seed=len(cells)))
                cells.append({"dataset": dataset, "method": method, "seed": seed, "eval_dir": eval_dir})
    (study / "study.json").write_text(json.dumps({"cells": cells}))
    assert figures.read_study(study) == {
        d: {m: study / f"{d}/{m}/seed0/eval-val" for m in ("ce", "cskd")} for d in ("cub", "dogs")
    }
    out = tmp_path / "figs"
    assert figures.main([str(study), "--output", str(out), "--tsne-per-class", "4"]) == 0, (
        capsys.readouterr().err
    )
    for dataset in ("cub", "dogs"):
        names = ("fig1b.png", "fig2_cskd.png", "fig3.png", "fig5_ce.png", "fig5_cskd.png", "fig5_overlay.png")
        for name in names:
            check_png(out / dataset / name, min_size=(300, 300))
    assert figures.main([str(study), "--names", "a", "--output", str(out)]) == 2
    assert "--names does not apply to a study folder" in capsys.readouterr().err


def test_errors_name_the_culprit(tmp_path, capsys, monkeypatch):
    probs, labels, features = synthetic()
    good = write_run(tmp_path / "good", probs, labels, features)
    perfect = np.eye(6, dtype=np.float32)[labels]
    write_run(tmp_path / "perfect", perfect, labels, features)
    (tmp_path / "empty").mkdir()
    for runs, message in (
        ([good, tmp_path / "empty"], "empty/predictions.npz not found (run python -m timm_cskd.evaluate with --save-predictions)"),
        ([good, tmp_path / "perfect"], f"perfect ({tmp_path / 'perfect'}): no misclassified samples"),
        ([good, good], "run names must differ"),
    ):  # fmt: skip
        assert figures.main([*map(str, runs), "--output", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing is drawn before every input is read"
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(ImportError, match=r"pip install 'timm-cskd\[study\]'"):
        figures.tsne_embedding(features, labels, [0, 1])


def test_figures_name_a_label_as_the_study_names_its_folder(tmp_path, capsys):
    """A label with characters a folder name replaces: figures' folder and files carry the study's name."""
    from timm_cskd import study

    data = tmp_path / "data"
    data.mkdir()
    planned = study.plan_study(
        tmp_path / "study", {"fmnist+50 (v2)": data}, ["ce", "cskd:temperature=4,lambda=1"]
    )
    cells = []
    for i, cell in enumerate(planned.cells):
        write_run(cell.eval_dir, *synthetic(sharpness=4 - 2 * i, seed=i))
        eval_dir = str(cell.eval_dir.relative_to(planned.output))
        cells.append(
            {"dataset": cell.dataset, "method": cell.row.label, "seed": cell.seed, "eval_dir": eval_dir}
        )
    (planned.output / "study.json").write_text(json.dumps({"cells": cells}))
    out = tmp_path / "figs"
    assert figures.main([str(planned.output), "--output", str(out), "--tsne-per-class", "4"]) == 0, (
        capsys.readouterr().err
    )
    for cell in planned.cells:
        dataset_folder, label_folder = cell.dir.parent.parent.name, cell.dir.parent.name
        assert "=" in label_folder or label_folder == "ce"
        check_png(out / dataset_folder / f"fig5_{label_folder}.png", min_size=(300, 300))
    check_png(out / planned.cells[0].dir.parent.parent.name / f"fig2_{planned.cells[1].dir.parent.name}.png")
