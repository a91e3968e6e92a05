import sys

from timm_cskd.study.cli import main

sys.exit(main())
