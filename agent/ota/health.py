"""`[ota] health_command`: the device's own say on whether the version on trial works (exit 0 = healthy)."""

from __future__ import annotations

import logging
import shlex
import subprocess

log = logging.getLogger(__name__)


def run_health_command(command: str, timeout: float) -> tuple[bool, str]:
    """Run `command` (argv words, no shell) for at most `timeout` s: (healthy, what happened).

    The detail names the command and, when it failed, its exit status and last output line, or that it
    did not finish in time (the rest of the commit deadline), or that it could not start.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return False, f"[ota] health_command {command!r} cannot be split: {exc}"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False, f"`{command}` did not finish within {timeout:.0f} s (the rest of the commit deadline)"
    except OSError as exc:
        return False, f"`{command}` could not start: {exc.strerror}"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode == 0:
        log.info("health check `%s` passed", command)
        return True, f"`{command}` exited 0"
    return False, f"`{command}` exited with status {proc.returncode}: {lines[-1] if lines else '(no output)'}"
