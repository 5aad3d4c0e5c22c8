"""Where bytes and results live, torch-free: storage (a folder or S3), the localization map's file format,
a result's files and key layout, the exports other tools read, and the pictures and report people read.

Part of the torch-free boundary that tests/test_architecture.py checks (the API process imports it).
"""
