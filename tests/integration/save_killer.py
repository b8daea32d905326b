"""Child process of ``test_final_save_kill.py``: resume a run and SIGKILL this process at one
point of the final model's save, found through Python's audit hooks (so the kill is real and
lands exactly there, not an exception that cleanup code could catch).

Usage: ``python save_killer.py CONFIG POINT EXCHANGE`` where POINT is one of ``KILL_POINTS`` and
EXCHANGE is ``on`` (the filesystem's atomic exchange) or ``off`` (the two-rename fallback, as on
a filesystem without ``renameat2``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from cot2align_ds import atomic, run_dir
from cot2align_ds.config import load_config
from cot2align_ds.train.loop import run_train

# Each point is a predicate on (event, args, output_dir); the process dies when the first
# matching event fires, before the operation it announces runs.
KILL_POINTS = {
    # the first file opened for writing inside the staging folder
    "staging-write": lambda event, args, out: (
        event == "open"
        and str(args[0]).startswith(str(out / run_dir.FINAL_MODEL_STAGING))
        and isinstance(args[2], int)
        and args[2] & (os.O_WRONLY | os.O_RDWR)
    ),
    # fallback: after the previous model moved aside, before the new one moved in
    "between-renames": lambda event, args, out: (
        event == "os.rename" and Path(args[0]) == out / run_dir.FINAL_MODEL_STAGING / "student"
    ),
    # after the swap, while the previous model (now in the staging folder) is deleted
    "cleanup": lambda event, args, out: (
        event == "shutil.rmtree" and Path(args[0]) == out / run_dir.FINAL_MODEL_STAGING / "student"
    ),
}


def main() -> None:
    config_path, point, exchange = sys.argv[1:4]
    config = load_config(config_path)
    out = Path(config.output_dir).absolute()
    wanted = KILL_POINTS[point]

    def hook(event: str, args: tuple) -> None:
        if event in ("open", "os.rename", "shutil.rmtree") and wanted(event, args, out):
            os.kill(os.getpid(), signal.SIGKILL)

    if exchange == "off":
        # A filesystem without an atomic exchange (e.g. some network filesystems).
        run_dir.exchange_paths = lambda first, second: False
    else:
        assert atomic.exchange_paths is run_dir.exchange_paths
    sys.addaudithook(hook)
    run_train(config, resume="auto")
    sys.exit("the save finished without reaching the kill point")


if __name__ == "__main__":
    main()
