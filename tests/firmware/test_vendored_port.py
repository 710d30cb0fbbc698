"""tests/firmware/vendored_port.py: a build that cannot happen says why (no skip), and the cache key
follows what the build is made of."""

from pathlib import Path

import pytest

from tests.firmware import vendored_port
from tests.firmware.vendored_port import FLAVOURS, BuildError


def test_a_missing_vendored_source_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vendored_port, "TARBALL", tmp_path / "shared" / "vendor" / vendored_port.SOURCE_NAME)
    monkeypatch.setattr(vendored_port, "CACHE", tmp_path / "cache")
    with pytest.raises(BuildError, match=r"the vendored MicroPython source is missing: .*shared/vendor"):
        vendored_port.ensure("frozen-64")


def test_a_missing_compiler_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no make
    monkeypatch.setattr(vendored_port, "CACHE", tmp_path / "cache")
    with pytest.raises(BuildError, match=r"is not installed; run scripts/install-deps\.sh"):
        vendored_port.ensure("frozen-32")


def test_the_cache_key_follows_the_frozen_sources_flags_and_patch(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    keys = {name: vendored_port.build_key(f) for name, f in FLAVOURS.items()}
    assert len(set(keys.values())) == len(keys)  # word size and variant are in the key
    shipped = tmp_path / "session.py"
    shipped.write_text("x = 1\n")
    sources = vendored_port.frozen_sources()
    monkeypatch.setattr(vendored_port, "frozen_sources", lambda: [*sources[:-1], shipped])
    before = {name: vendored_port.build_key(f) for name, f in FLAVOURS.items()}
    shipped.write_text("x = 2\n")
    after = {name: vendored_port.build_key(f) for name, f in FLAVOURS.items()}
    assert before["frozen-32"] != after["frozen-32"] and before["frozen-64"] != after["frozen-64"]
    assert before["romfs-64"] == after["romfs-64"]  # nothing of ours is frozen into it
    monkeypatch.setattr(vendored_port, "ROMFS_PATCH", (("a", "b"),))
    assert vendored_port.build_key(FLAVOURS["romfs-64"]) != after["romfs-64"]
