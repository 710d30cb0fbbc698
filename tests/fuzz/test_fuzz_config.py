"""Config files as an installer or a fleet override writes them (base file plus a config.d drop-in):
random TOML documents built from the real sections and keys, mutated valid files and raw bytes.
Only ConfigError may escape `agent.config.load`. Oracle: an accepted configuration has a device id
that obeys the id rule (restated here: 1 to 64 letters, digits, '.', '_', '-'; not '.' or '..'; not
a reserved service identity) and a keepalive within 5..65535 s."""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
import typing
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from agent.config import SECTIONS, ConfigError, load
from tests.fuzz.inputs import FUZZ, mutated, scratch, tried

WORK = scratch("tether-fuzz-config-")
KEYS = {name: list(typing.get_type_hints(cls)) for name, cls in SECTIONS.items()}
VALID = (b'[device]\nid = "dev-001"\nstate_dir = "state"\n\n[mqtt]\nkeepalive = 60\nbackoff_base = 0.5\n'
         b'[endpoints]\nurls = ["mqtts://core:8883"]\nca_file = "ca.pem"\n[keys]\nbackend = "file"\n')

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                 else repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    return str(value)


scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), texts,
                    st.sampled_from(["dev-001", "state", "a\x00b", "../x", "/abs", "file", "tpm", "5", "67%"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=2),
                      max_leaves=6)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    out = []
    for section in draw(st.lists(st.sampled_from([*KEYS, "bogus"]), max_size=5, unique=True)):
        out.append(f"[{section}]")
        names = [*KEYS.get(section, []), "bogus"]
        for key in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
            value = draw(st.sampled_from(["dev-001", "state"])) if (section, key) == ("device", "id") \
                and draw(st.booleans()) else draw(values)
            out.append(f"{key} = {toml_value(value)}")
    if draw(st.booleans()):
        ids = ["dev-001", "x:y", "", "a/b", "..", ".", "tether-token-service", "x" * 65]
        out.insert(0, f'[device]\nid = "{draw(st.sampled_from(ids))}"')
    return "\n".join(out).encode()


inputs = st.one_of(documents(), documents(), mutated([VALID]), st.binary(max_size=200))


@FUZZ
@given(inputs, st.one_of(st.none(), inputs))
@example(b'[device]\nid = "dev-001"\nstate_dir = "a\\u0000b"\n', None)  # found by this test: ValueError escaped
def test_config_files_raise_only_config_errors(base: bytes, dropin: bytes | None) -> None:
    tried("config file (agent.config.load, base + config.d drop-in)")
    directory = Path(tempfile.mkdtemp(dir=WORK))
    (directory / "tether.toml").write_bytes(base)
    if dropin is not None:
        (directory / "config.d").mkdir()
        (directory / "config.d" / "10-fuzz.toml").write_bytes(dropin)
    with contextlib.suppress(ConfigError):
        config = load(directory / "tether.toml")
        device_id = config.device.id
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", device_id) and device_id not in (".", ".."), device_id
        assert device_id not in ("tether-token-service", "tether-ota-service"), device_id
        assert 5 <= config.mqtt.keepalive <= 65535
