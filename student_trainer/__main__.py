import sys

from student_trainer.cli import main

sys.exit(main())
