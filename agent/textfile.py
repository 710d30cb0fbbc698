"""`tether status --format prometheus`: the device's status in Prometheus' text exposition format, for
node_exporter's textfile collector (https://github.com/prometheus/node_exporter#textfile-collector).

Rendered by hand from the status dict (`tether status --json`'s): the format is a few lines of text
(https://prometheus.io/docs/instrumenting/exposition_formats/), and the device runtime stays free of a
metrics library. Times are Unix timestamps (`..._timestamp_seconds`), so an alert computes what is
left (`tether_certificate_expiry_timestamp_seconds - time() < 14 * 86400`).
"""

from __future__ import annotations

from typing import Any

SESSION_STATES = ("booting", "connecting", "online", "reconnecting", "stopped")


def _label(value: object) -> str:
    """A label value, escaped as the exposition format requires (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(status: dict[str, Any]) -> str:
    """The exposition text for one `tether status` dict (identity facts merged with the runtime's file)."""
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[dict[str, object], float]]) -> None:
        lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} gauge"))
        for labels, value in samples:
            rendered = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            number = str(int(value)) if float(value).is_integer() else repr(float(value))  # %g loses digits
            lines.append(f"{name}{{{rendered}}} {number}" if rendered else f"{name} {number}")

    key = status.get("key") or {}
    gauge("tether_device_info", "The device's identity and key backend (always 1)",
          [({"device_id": status.get("device_id", ""), "key_backend": key.get("backend", "")}, 1)])
    gauge("tether_key_present", "1 if the device's private key exists", [({}, 1 if key.get("present") else 0)])
    chain = status.get("chain")
    gauge("tether_certificate_present", "1 if the device holds a certificate chain", [({}, 1 if chain else 0)])
    if chain:
        gauge("tether_certificate_expiry_timestamp_seconds", "When the device certificate expires (Unix time)",
              [({"serial": chain.get("serial", "")}, float(chain["not_after"]))])
    session = status.get("session")
    if session:
        gauge("tether_session", "The agent's session state (1 for the current one)",
              [({"state": s}, 1 if s == session else 0) for s in (*SESSION_STATES,
                                                                   *(() if session in SESSION_STATES else (session,)))])
    gauge("tether_endpoint_errors", "Endpoints that refused the device at the last attempt",
          [({}, len(status.get("endpoint_errors") or {}))])
    token = status.get("token") or {}
    if token.get("expires_at"):
        gauge("tether_token_expiry_timestamp_seconds", "When the device's current token expires (Unix time)",
              [({}, float(token["expires_at"]))])
    if status.get("updated_at"):
        gauge("tether_status_updated_timestamp_seconds", "When the running agent last wrote its status (Unix time)",
              [({}, float(status["updated_at"]))])
    return "\n".join(lines) + "\n"
