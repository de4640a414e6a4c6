import sys

from ckd_common.cli import main

sys.exit(main())
