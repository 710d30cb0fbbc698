"""The ``c8y_Firmware`` operation's SmartREST lines (Cumulocity "SmartREST 2.0" static templates):
``515`` in (the update request), ``114``, ``115``, ``501``, ``502``, ``503`` out.

Only the Linux agent's OTA (agent/ota/agent.py) uses them. Boards run no OTA, so firmware/manifest.py
does not ship this module: its functions, names and strings stay out of a board's heap, where each
costs bytes even never called. Parsing and quoting are agent/core/smartrest.py's.
"""

from agent.core.errors import SmartRestError, describe
from agent.core.smartrest import expect_fields, format_line, parse_line, quote

FIRMWARE = "c8y_Firmware"


class FirmwareOperation:
    """A ``515`` firmware update request: ``serial`` (target device), ``name``, ``version``, ``url``."""

    def __init__(self, serial, name, version, url):
        self.serial = serial
        self.name = name
        self.version = version
        self.url = url

    def __eq__(self, other):
        return isinstance(other, FirmwareOperation) and self.fields() == other.fields()

    def __ne__(self, other):
        return not self.__eq__(other)

    def fields(self):
        """The four fields in wire order."""
        return (self.serial, self.name, self.version, self.url)

    def __repr__(self):
        return "FirmwareOperation(%r, %r, %r, %r)" % self.fields()


def parse_firmware_operation(line):
    """Parse ``515,<serial>,<name>,<version>,<url>`` into a FirmwareOperation.

    Raises SmartRestError naming ``515.<field>`` when a field is missing or empty.
    """
    names = ("serial", "name", "version", "url")
    fields = parse_line(line)
    expect_fields(fields, "515", names)
    for i, name in enumerate(names):
        if not fields[i + 1]:
            raise SmartRestError("515." + name, "empty")
    url = fields[4]
    if not (url.startswith("https://") or url.startswith("http://")):
        raise SmartRestError("515.url", "expected an http(s) URL, got %s" % describe(url))
    return FirmwareOperation(fields[1], fields[2], fields[3], url)


def firmware_executing():
    """``501,c8y_Firmware``: the firmware operation is now executing."""
    return format_line("501", FIRMWARE)


def firmware_successful():
    """``503,c8y_Firmware``: the firmware operation succeeded."""
    return format_line("503", FIRMWARE)


def firmware_failed(reason):
    """``502,c8y_Firmware,"<reason>"``: the operation failed; the reason is always quoted."""
    return "502,%s,%s" % (FIRMWARE, quote(reason, always=True))


def firmware_installed(name, version, url=""):
    """``115,<name>,<version>,<url>``: the installed firmware."""
    for field, value in (("name", name), ("version", version)):
        if not value:
            raise SmartRestError("115." + field, "empty")
    return format_line("115", name, version, url)


def supported_operations(operations=(FIRMWARE,)):
    """``114,<op>,...``: operations this device supports (``c8y_Firmware`` by default)."""
    if not operations:
        raise SmartRestError("114.operations", "at least one operation is required")
    return format_line("114", *operations)
