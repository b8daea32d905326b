"""Child process of ``test_teacher_cache.py``: build a teacher cache and SIGKILL this process
as its second shard's manifest is about to be renamed into place, through Python's audit hooks:
the first shard is complete, the second one's tensors are on disk without a manifest.

Usage: ``python cache_killer.py CONFIG``.
"""

from __future__ import annotations

import os
import signal
import sys

from cot2align_ds.config import load_config
from cot2align_ds.teacher_cache.build import build_teacher_cache


def main() -> None:
    config = load_config(sys.argv[1])

    manifests = []

    def hook(event: str, args: tuple) -> None:
        # os.replace of a manifest's temp file onto shard-*.json (audited before it runs).
        if event == "os.rename" and str(args[1]).endswith(".json") and "shard-" in str(args[1]):
            manifests.append(args[1])
            if len(manifests) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    build_teacher_cache(config)


if __name__ == "__main__":
    main()
