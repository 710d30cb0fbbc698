"""Parser for the AWS IoT Greengrass discovery response (DESIGN.md "Endpoints").

Shape: ``{"GGGroups": [{"GGGroupId": str, "Cores": [{"thingArn": str, "Connectivity":
[{"Id": str, "HostAddress": str, "PortNumber": int, "Metadata": str}]}], "CAs": [PEM, ...]}]}``
(AWS IoT Greengrass developer guide, "Discover API"). The group's CAs are the trust anchors for
that group's cores, so each endpoint carries them. Every type error names its JSON path.
"""

import json

from agent.core.endpoints import DISCOVERY, Endpoint, check_host, check_port
from agent.core.errors import EndpointError, describe

MAX_DISCOVERY_BYTES = 256 * 1024
PEM_BEGIN = "-----BEGIN CERTIFICATE-----"


def _get(obj, key, path, kind, required=True):
    if key not in obj:
        if required:
            raise EndpointError(path + "." + key if path else key, "missing")
        return None
    value = obj[key]
    field = path + "." + key if path else key
    if kind == "list" and not isinstance(value, list):
        raise EndpointError(field, "expected an array, got %s" % describe(value))
    if kind == "str" and not isinstance(value, str):
        raise EndpointError(field, "expected a string, got %s" % describe(value))
    if kind == "obj" and not isinstance(value, dict):
        raise EndpointError(field, "expected an object, got %s" % describe(value))
    return value


def _obj(value, field):
    if not isinstance(value, dict):
        raise EndpointError(field, "expected an object, got %s" % describe(value))
    return value


def parse_discovery(body, max_bytes=MAX_DISCOVERY_BYTES):
    """Parse a discovery response (str or bytes) into ``(endpoints, cas)``.

    ``endpoints`` lists one Endpoint (source ``discovery``, ``ca`` = the group's CAs joined)
    per connectivity entry, in document order; ``cas`` lists the distinct CA PEM strings.
    Raises EndpointError for a body over ``max_bytes``, non-JSON, any field of the wrong type
    (naming its path, e.g. ``GGGroups[0].Cores[1].Connectivity[0].PortNumber``), or no cores.
    """
    if isinstance(body, str):
        size = len(body)  # characters; a cheap upper-bound check before encoding
    elif isinstance(body, (bytes, bytearray)):
        size = len(body)
    else:
        raise EndpointError("discovery", "expected text or bytes, got %s" % type(body).__name__)
    if size > max_bytes:
        raise EndpointError("discovery", "body of %d bytes is over the %d limit" % (size, max_bytes))
    if not isinstance(body, str):
        try:
            body = bytes(body).decode()
        except UnicodeError:
            raise EndpointError("discovery", "body is not UTF-8") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise EndpointError("discovery", "body is not JSON") from None
    _obj(doc, "discovery")
    groups = _get(doc, "GGGroups", "", "list")
    endpoints = []
    cas = []
    cores = 0
    for gi, group in enumerate(groups):
        gpath = "GGGroups[%d]" % gi
        _obj(group, gpath)
        _get(group, "GGGroupId", gpath, "str")
        group_cas = _get(group, "CAs", gpath, "list")
        for ci, pem in enumerate(group_cas):
            cpath = "%s.CAs[%d]" % (gpath, ci)
            if not isinstance(pem, str):
                raise EndpointError(cpath, "expected a PEM string, got %s" % describe(pem))
            if PEM_BEGIN not in pem:
                raise EndpointError(cpath, "not a PEM certificate (no %s)" % PEM_BEGIN)
            if pem not in cas:
                cas.append(pem)
        ca = "\n".join(group_cas) if group_cas else None
        for ki, core in enumerate(_get(group, "Cores", gpath, "list")):
            kpath = "%s.Cores[%d]" % (gpath, ki)
            _obj(core, kpath)
            _get(core, "thingArn", kpath, "str")
            cores += 1
            for ni, conn in enumerate(_get(core, "Connectivity", kpath, "list")):
                npath = "%s.Connectivity[%d]" % (kpath, ni)
                _obj(conn, npath)
                _get(conn, "Id", npath, "str", required=False)
                _get(conn, "Metadata", npath, "str", required=False)
                host = check_host(_get(conn, "HostAddress", npath, "str"), npath + ".HostAddress")
                if "PortNumber" not in conn:
                    raise EndpointError(npath + ".PortNumber", "missing")
                port = check_port(conn["PortNumber"], npath + ".PortNumber")
                endpoints.append(Endpoint(host, port, ca, DISCOVERY))
    if not cores:
        raise EndpointError("GGGroups", "no cores in the discovery response")
    if not endpoints:
        raise EndpointError("GGGroups", "cores listed but none has a Connectivity entry")
    return endpoints, cas
