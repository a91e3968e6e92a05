"""Studies: the paper's tables for your data, a grid of datasets x methods x seeds run as ordinary
trainer runs (``python -m timm_cskd.study --help`` describes the command and the grid file).

``rows`` and ``plan`` turn methods, sweeps and a grid file into cells with their commands; ``cells``
keeps each cell's record and lock; ``runner`` runs the cells; ``summary`` writes the study's files;
``tables``, ``stats`` and ``regime`` are the paper's tables, Welch's t and the calibration regime in
words, and ``report`` the analysis from a study folder (``python -m timm_cskd.study_report``); ``cli`` is
the command line."""

from timm_cskd.study.cells import cell_state, check_study, claim_cell
from timm_cskd.study.cli import main
from timm_cskd.study.errors import StudyError
from timm_cskd.study.plan import Cell, Study, load_grid, plan_study
from timm_cskd.study.rows import Row, parse_method_spec
from timm_cskd.study.runner import CellResult, StudyReport, print_plan, run_cell, run_study
from timm_cskd.study.summary import summarise
from timm_cskd.study.tables import dataset_table

__all__ = [
    "Cell",
    "CellResult",
    "Row",
    "Study",
    "StudyError",
    "StudyReport",
    "cell_state",
    "check_study",
    "claim_cell",
    "dataset_table",
    "load_grid",
    "main",
    "parse_method_spec",
    "plan_study",
    "print_plan",
    "run_cell",
    "run_study",
    "summarise",
]
