# Boards run main.py at boot. The agent is compiled (tether_main.mpy, or frozen); this stub only
# starts it. It must not import a module named "main": that would be this file again.
import tether_main

tether_main.main()
