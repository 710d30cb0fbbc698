"""Pure protocol logic shared by the CPython agent and the MicroPython firmware.

Nothing here performs I/O or reads a clock: callers pass in bytes, text, the current time and
randomness. Every module runs unchanged on CPython 3.11 and MicroPython 1.27, so it avoids
``typing``, dataclasses, pathlib, ``abc`` and f-string ``=``; see DESIGN.md "Tests and real parts".
"""
