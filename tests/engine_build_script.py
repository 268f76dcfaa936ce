"""Run the slow one-stage build of ``engine_tasks.slow_stage`` (the engine kill test).

Usage: ``python engine_build_script.py RELEASE_DIR COUNT DELAY WORKERS`` (WORKERS 0: local).
Exit status 0 when the build is ok, 1 otherwise.
"""

import signal
import sys
from pathlib import Path

from engine_tasks import slow_stage

from ks4release.engine import Engine


def main(argv: list[str]) -> int:
    # A shell without job control starts background commands with SIGINT ignored, and the
    # test's Ctrl-C would then do nothing; a user's terminal gives Python its default handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    release, count, delay, workers = Path(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    engine = Engine(release, workers=workers or None, local=workers == 0, progress=False)
    summary = engine.run([slow_stage(count, delay)], release.resolve())
    print(summary.text())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
