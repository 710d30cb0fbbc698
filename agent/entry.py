"""The `tether` command's entry point (pyproject's [project.scripts]): agent.cli, started with the
cyclic garbage collector off.

Start-up (issue 24) allocates the objects the process keeps to its end: modules, classes, the
configuration, the runtime. CPython's collector ran over them again and again while they were made,
for nothing it could free: 13 M of the ~335 M instructions `tether run` took to CONNACK.
`agent.cli.end_of_start` turns it back on once they are built, with them frozen out of its sight
(`gc.freeze`), so no later collection looks at them either: the work is gone, not postponed. What
start-up leaves in reference cycles (~600 objects, ~120 KB: mostly the pure-Python `datetime` classes
that `_datetime` replaces, and typing's temporaries) is kept instead of collected.
"""

from __future__ import annotations

import gc


def main() -> int:
    gc.disable()
    from agent.cli import main as cli_main  # after gc.disable(): importing it is most of the start-up

    return cli_main()
