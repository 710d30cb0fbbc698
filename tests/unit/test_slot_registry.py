"""Slot backends chosen by name declare their [ota] options in the registry (as hal/keys' backends do);
an option the chosen backend does not take is refused with the key named, never swallowed."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from agent.config import load
from agent.ota.slots import open_configured
from hal.slots import BACKENDS, SlotError, open_slots
from tests.conftest import write_config


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_registry_entry_declares_exactly_the_keywords_its_class_takes(name: str) -> None:
    entry = BACKENDS[name]
    module, cls = entry.target.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), "no **kwargs to swallow"
    assert set(params) - {"directory"} == set(entry.options.values()) | set(entry.hooks)


@pytest.mark.parametrize("name", ["uboot", "command", "swupdate"])
def test_installer_backends_are_an_installer_and_a_boot_selector_composed_not_subclasses(
        name: str, tmp_path: Path) -> None:
    """Issue 23 item 6: `swupdate` was SwupdateSlots(CommandSlots(UBootSlots)). Now every backend class
    stands alone, and the three that share the U-Boot environment share it as a part."""
    from hal.slots.composed import Slots
    from hal.slots.uboot import UBootEnv

    options = {"install_command": "tool {file}"} if name == "command" else {}
    slots = open_slots(name, tmp_path, options)
    assert isinstance(slots, Slots) and slots.backend == name
    selector = getattr(slots.selector, "selector", slots.selector)  # command/swupdate: wrapped by their hooks
    assert isinstance(selector, UBootEnv)
    assert {"stage", "prepare", "install"} <= set(dir(slots.installer))
    assert not hasattr(slots.installer, "switch") and not hasattr(slots.selector, "install")
    for module in ("hal.slots.uboot", "hal.slots.command", "hal.slots.swupdate", "hal.slots.composed",
                   "hal.slots.directory", "hal.slots.rauc"):
        for _, cls in inspect.getmembers(importlib.import_module(module), inspect.isclass):
            if cls.__module__ == module and not issubclass(cls, Exception) and "Protocol" not in str(cls.__mro__):
                assert cls.__bases__ == (object,), f"{cls.__qualname__} inherits {cls.__bases__}"


def test_an_option_the_backend_does_not_take_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SlotError, match=r"\[ota\] install_command: slots = 'directory' takes no such option; "
                                        r"it takes none"):
        open_slots("directory", tmp_path, {"install_command": "swupdate -i {file}"})
    with pytest.raises(SlotError, match=r"\[ota\] env_confg: slots = 'uboot' takes no such option; "
                                        r"it takes uboot_env_config"):
        open_slots("uboot", tmp_path, {"env_confg": "/etc/fw_env.config"})


def test_a_configured_option_for_another_backend_is_refused_not_ignored(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "dev", "dev-1", ota={"slots": "directory",
                                                               "install_command": "swupdate -i {file}"}))
    with pytest.raises(SlotError, match=r"\[ota\] install_command: slots = 'directory' takes no such option"):
        open_configured(config)
    assert not (tmp_path / "dev" / "state" / "slots").exists()  # refused before anything was created


def test_the_configured_backend_gets_its_options_and_hooks(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "dev", "dev-1", ota={"slots": "directory"}))
    slots = open_configured(config, progress=print, floor=lambda: "1.0")
    assert slots.active() == "a"
