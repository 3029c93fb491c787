"""Layer 0: what every other layer uses (errors, atomic writes, the config, devices, processes)."""
