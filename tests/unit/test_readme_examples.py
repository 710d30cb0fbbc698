"""The README's examples of what the CLI prints are what it prints (issue 26: the chain-rejection
example had drifted from the one-line error `tether` writes)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from agent.config import load
from agent.identity import DeviceIdentity
from provisioning.certs import to_pem
from tests.conftest import REPO, run_tether, write_config
from tests.pki import Pki

README = REPO / "README.md"


def readme_block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    block = text[text.index("```", start) + 3:]
    return block[block.index("\n") + 1:block.index("```")].strip()


def test_the_chain_rejection_example_is_the_line_the_cli_prints(tmp_path: Path) -> None:
    """An expired leaf whose issuing CA is missing (the README's two broken rules), installed for real."""
    pki = Pki.create(tmp_path / "pki", name="Factory")
    config = write_config(tmp_path / "dev", "pump-0042", identity={"ca_file": str(pki.root_file)})
    assert run_tether("keygen", config=config).returncode == 0
    key = DeviceIdentity(load(config)).keystore.public_key("device")
    leaf, _issuing, root = pki.device_chain(key, "pump-0042", lifetime=dt.timedelta(days=30),
                                            not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=60))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(to_pem([leaf, root]))
    out = run_tether("chain", "install", str(chain), config=config)
    assert out.returncode == 1 and out.stdout == ""
    printed = out.stderr.strip()
    assert "\n" not in printed

    example = readme_block_after("`tether chain install` refuses a chain")
    assert "\n" not in example, "the CLI prints one line; so must the README"

    def shape(line: str) -> str:  # serials, times and DNs differ from run to run; the words must not
        line = re.sub(r"0x[0-9a-f]+(\.\.\.)?", "SERIAL", line)
        line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", line)
        return re.sub(r"'[A-Z]+=[^']*'", "'DN'", line)

    assert shape(example) == shape(printed), f"README:\n{example}\nCLI:\n{printed}"
