"""The lab's discovery server answers only for the thing named in the client certificate: a device
cannot learn another thing's cores and CAs (AWS IoT Greengrass discovery authorizes the same way)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lab.discovery import DiscoveryServer, greengrass_document
from tests.agent_bed import provisioned_device
from tests.conftest import run_tether
from tests.pki import Pki
from tests.security.conftest import check_output


@pytest.fixture
def discovery(tmp_path: Path, pki: Pki) -> DiscoveryServer:
    certfile, keyfile = pki.server_files("discovery")
    secret = greengrass_document([("core-of-b.internal", 8883)], [pki.root_file.read_text()], group="group-of-b")
    server = DiscoveryServer(certfile, keyfile, pki.ca_chain_file, secret).start()
    yield server
    server.stop()


def test_device_cannot_discover_another_thing(tmp_path: Path, pki: Pki, discovery: DiscoveryServer) -> None:
    config = provisioned_device(tmp_path, pki, "dev-A", token={"enabled": False},
                                discovery={"url": discovery.url, "thing": "dev-B"})
    out = run_tether("check", config=config)
    assert out.returncode == 1 and "FAIL  discovery" in out.stdout, check_output(out)
    assert "HTTP 403" in out.stderr and "may not discover thing 'dev-B'" in out.stderr, check_output(out)
    assert "core-of-b" not in out.stdout + out.stderr
    assert discovery.requests == ["dev-B"]
    assert not (tmp_path / "dev-A" / "state" / "discovery.json").exists()

    # the same refusal for a hand-made request with dev-A's certificate, path tricks included
    certfile, keyfile = pki.device_files("dev-A")
    ctx = ssl.create_default_context(cafile=str(pki.root_file))
    ctx.load_cert_chain(str(certfile), str(keyfile))
    for thing in ("dev-B", "dev-A/../dev-B", "dev-A%2F..%2Fdev-B", "DEV-A", "dev-A?x=dev-B"):
        url = f"{discovery.url}/greengrass/discover/thing/{thing}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, context=ctx, timeout=10)  # noqa: S310
        assert refused.value.code == 403, thing
    with urllib.request.urlopen(f"{discovery.url}/greengrass/discover/thing/dev-A", context=ctx,  # noqa: S310
                                timeout=10) as own:
        assert own.status == 200 and json.loads(own.read())["GGGroups"]  # the control: its own thing works
