"""``python -m timm_cskd.study_report STUDY_DIR``, the documented command for a study folder's analysis:
``timm_cskd.study.report``'s command line, kept under the name the README, ``timm-cskd study-report``
and users' scripts run."""

import sys

from timm_cskd.study.report import main, report

__all__ = ["main", "report"]

if __name__ == "__main__":
    sys.exit(main())
