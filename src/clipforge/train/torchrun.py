"""`python -m torch.distributed.run`, whose report of failed workers is data for the launcher, not a traceback.

torchrun ends a failed group with its own traceback and a table (rank, pid,
exit code or signal), after the failed worker's output and the others'. The
launcher (`launch.relaunch`) runs this module instead: the same arguments, the
same run, and the failures written to `failures.json` in CLIPFORGE_LAUNCH_DIR,
which the launcher says in one line ("worker rank 1 was killed (SIGKILL) ...").
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from clipforge.train.launch import FAILURES_NAME, LAUNCH_DIR_ENV


def main(argv: list[str]) -> int:
    try:
        run(parse_args(argv))  # not torch.distributed.run.main: its @record prints the table
    except ChildFailedError as exc:
        failures = [{"rank": rank, "pid": failure.pid, "exitcode": failure.exitcode,
                     "signal": failure.signal_name() if failure.exitcode < 0 else None}
                    for rank, failure in sorted(exc.failures.items())]
        Path(os.environ[LAUNCH_DIR_ENV], FAILURES_NAME).write_text(json.dumps(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
