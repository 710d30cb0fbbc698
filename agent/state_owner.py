"""The agent acts on its state only as the user the state belongs to (issue 22, item 2).

The state directory (keys, certificates, token, OTA state) belongs to the agent's user, `tether` on a
device. A root process working there reads, parses, executes with and writes next to files that user
controls: a FIFO, a symlink or a swapped file turns into root's action (the tpm2 provider's OpenSSL
configuration, loaded as uid 0, was one). Dropping to that user from inside Python would also need its
groups (`tss` for the TPM) and a clean environment, which `runuser` already does right; so the CLI
refuses and prints the exact command instead. The systemd unit runs the agent as `tether`, the owner, and
the .deb's postinst runs no `tether` command, so neither meets this refusal.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence

from agent.config import Config
from agent.errors import AgentError


def owner_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def require_own_state(config: Config, argv: Sequence[str]) -> None:
    """AgentError unless the state and key directories (where they exist) belong to this process's user.

    The message names the directory and its owner and ends with the command that runs `argv` as that
    owner. Nothing is read from or written to the directories before this check.
    """
    me = os.geteuid()
    for directory in dict.fromkeys((config.state_dir, config.keys_dir)):
        owner = _owner(directory)
        if owner is None or owner == me:
            continue
        import shlex  # quotes the command of a refusal only: not loaded by every start (issue 24)

        name = owner_name(owner)
        who = f"{name} (uid {owner})" if name else f"uid {owner}, a user with no name"
        how = (f"runuser -u {shlex.quote(name)} -- tether {shlex.join(argv)}" if name
               else f"give {directory} a user and run `tether {shlex.join(argv)}` as that user")
        raise AgentError(f"{directory} belongs to {who}, not to uid {me}: its files would act on this process; "
                         f"run the command as that user: {how}")


def _owner(directory: str) -> int | None:
    try:
        return os.stat(directory).st_uid
    except FileNotFoundError:
        return None  # created by this command, as us
    except OSError as exc:
        raise AgentError(f"{directory}: cannot check who owns it: {exc.strerror}") from None
