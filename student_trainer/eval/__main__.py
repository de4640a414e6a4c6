import sys

from student_trainer.eval.cli import main

sys.exit(main())
