"""`tether-station`'s sub-commands, one module per concern; each module's `add_commands(sub, common)` adds
its parsers and returns its handlers by command name (`cli.py` composes them, as agent/cli.py does)."""
