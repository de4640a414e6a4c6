import sys

from ckd_eval.cli import main

sys.exit(main())
