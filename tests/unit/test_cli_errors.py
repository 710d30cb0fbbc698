"""Every project error ends a `tether` command with one line on stderr and exit status 1: the agent's
ConfigError (a wrong configuration file) and core's ParameterError (a value pure logic refuses) alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_tether, write_config

# Runs the real CLI entry point in a child process after swapping the `status` command for one that
# raises the error named on the command line: the path from any command's error to the exit status.
RAISER = """
import sys
from agent import cli, commands
from agent.core.errors import ParameterError
from agent.errors import ConfigError

kind = sys.argv[1]

def failing(args, config):
    if kind == "core":
        raise ParameterError("backoff.cap", "must be >= base 4, got 2")
    raise ConfigError("/etc/tether/tether.toml: [mqtt] keepalive: outside 5..65535\\nsecond line")

commands.COMMANDS["status"] = failing
sys.exit(cli.main(["--config", sys.argv[2], "status"]))
"""


def test_the_two_config_errors_are_distinct_names() -> None:
    from agent.core import errors as core_errors
    from agent.errors import ConfigError

    assert core_errors.ParameterError.__name__ == "ParameterError"
    assert not issubclass(core_errors.ParameterError, ConfigError)
    assert ConfigError.__name__ == "ConfigError"


@pytest.mark.parametrize("kind,prefix", [("core", "tether: error: backoff.cap: must be >= base 4, got 2"),
                                         ("agent", "tether: configuration error: /etc/tether/tether.toml: "
                                                   "[mqtt] keepalive: outside 5..65535 second line")])
def test_a_command_raising_either_error_prints_one_line_and_exits_1(tmp_path: Path, kind: str,
                                                                     prefix: str) -> None:
    config = write_config(tmp_path, "dev-001")
    done = subprocess.run([sys.executable, "-c", RAISER, kind, str(config)], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == prefix + "\n"


def test_check_with_a_wildcard_topic_prefix_is_one_line_naming_file_section_and_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, "dev-001", mqtt={"topic_prefix": "a/+"})
    done = run_tether("check", config=config)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert f"{config}: [mqtt] topic_prefix: must not contain the MQTT wildcards" in done.stderr
