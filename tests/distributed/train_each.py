"""Train each run config named on the command line, in turn, in this launched process: one
process group (and one start-up) serves every run."""

import sys
from pathlib import Path

from cot2align_ds.runs import run_train_command

for path in sys.argv[1:]:
    run_train_command(Path(path), [], overwrite=False, resume=None)
