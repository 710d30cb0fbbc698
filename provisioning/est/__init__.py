"""EST (RFC 7030) enrollment: the device-side client."""
