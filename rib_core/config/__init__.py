"""Every stage's typed settings, torch-free: the API, the CLI and the workers validate with the same objects.

The authors' per-data-set values (presets), RIB's settings (paper sections 3.2 and 4.1) and those of every
stage after it. Part of the torch-free boundary that tests/test_architecture.py checks.
"""
