"""The boot-time service's cache of parsed configuration files (agent.config.ParseCache, issue 24).

The cache decides what the agent connects to and trusts, so each test here is about when it is NOT
believed: another user could have written it, it is a link, it is not ours, or the file changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as configmod
from agent.config import CACHE_ENV, CACHE_FILE
from tests.conftest import write_config
from tests.unit.test_layers import REPO


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv(CACHE_ENV, str(directory))
    return directory


def _poison(cache_dir: Path, config: Path, device_id: str = "evil-001") -> Path:
    """Rewrite the cached parse of `config` to name another device, keeping its (valid) digest."""
    cache = cache_dir / CACHE_FILE
    entries = json.loads(cache.read_bytes())
    entries[str(config)]["toml"]["device"]["id"] = device_id
    cache.write_text(json.dumps(entries))
    cache.chmod(0o600)
    return cache


def test_a_cached_configuration_loads_without_tomllib(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001", mqtt={"keepalive": 30})
    fresh = configmod.load(config)
    assert (cache_dir / CACHE_FILE).exists()
    assert (cache_dir / CACHE_FILE).stat().st_mode & 0o777 == 0o600
    code = ("import sys\n"
            "from agent import config\n"
            f"c = config.load({str(config)!r})\n"
            "print('tomllib' in sys.modules, c.device.id, c.mqtt.keepalive)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, CACHE_ENV: str(cache_dir)})
    assert out.stdout.split() == ["False", "dev-001", "30"]
    assert configmod.load(config) == fresh


def test_the_cache_is_believed_for_its_own_bytes(tmp_path: Path, cache_dir: Path) -> None:
    """What makes a poisoned cache matter: an entry whose digest matches is used as it is."""
    config = write_config(tmp_path / "dev", "dev-001")
    configmod.load(config)
    _poison(cache_dir, config)
    assert configmod.load(config).device.id == "evil-001"


def test_an_edited_file_is_parsed_again(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001")
    configmod.load(config)
    _poison(cache_dir, config)
    config.write_text(config.read_text().replace("dev-001", "dev-002"))  # same size, maybe the same mtime
    assert configmod.load(config).device.id == "dev-002"
    assert configmod.load(config).device.id == "dev-002"  # and the new parse is what is cached


def test_a_cache_other_users_can_write_is_ignored(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001")
    configmod.load(config)
    _poison(cache_dir, config).chmod(0o666)
    assert configmod.load(config).device.id == "dev-001"


def test_a_cache_in_a_directory_other_users_can_write_is_ignored(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001")
    configmod.load(config)
    _poison(cache_dir, config)
    cache_dir.chmod(0o777)
    assert configmod.load(config).device.id == "dev-001"
    assert json.loads((cache_dir / CACHE_FILE).read_bytes())[str(config)]["toml"]["device"]["id"] == "evil-001"


def test_a_cache_that_belongs_to_another_user_is_ignored(tmp_path: Path, cache_dir: Path) -> None:
    assert os.geteuid() == 0, "this test gives the cache to uid 12345: run it as root (CI does)"
    config = write_config(tmp_path / "dev", "dev-001")
    configmod.load(config)
    os.chown(_poison(cache_dir, config), 12345, 12345)
    assert configmod.load(config).device.id == "dev-001"


def test_a_link_in_place_of_the_cache_is_not_followed(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001")
    configmod.load(config)
    elsewhere = tmp_path / "elsewhere.json"
    _poison(cache_dir, config).rename(elsewhere)
    (cache_dir / CACHE_FILE).symlink_to(elsewhere)
    assert configmod.load(config).device.id == "dev-001"


def test_a_corrupt_cache_is_rebuilt(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001")
    (cache_dir / CACHE_FILE).write_bytes(b"{not json")
    (cache_dir / CACHE_FILE).chmod(0o600)
    assert configmod.load(config).device.id == "dev-001"
    assert str(config) in json.loads((cache_dir / CACHE_FILE).read_bytes())


def test_without_the_units_cache_directory_nothing_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    config = write_config(tmp_path / "dev", "dev-001")
    configmod.load(config)
    assert sorted(p.name for p in config.parent.iterdir()) == ["tether.toml"]


def test_a_bad_file_is_still_refused_with_its_name(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "dev", "dev-001")
    config.write_text(config.read_text() + "\n[mqtt]\nkeepalive = 'soon'\n")
    with pytest.raises(configmod.ConfigError, match=r"tether.toml: \[mqtt\] keepalive: expected integer"):
        configmod.load(config)
    with pytest.raises(configmod.ConfigError, match=r"tether.toml: \[mqtt\] keepalive: expected integer"):
        configmod.load(config)  # the cached parse goes through the same checks
