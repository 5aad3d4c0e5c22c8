"""The data sets and their ground truth, torch-free: the manifest format, class lists, importers of VOC and
COCO, the MNIST scenes demo set, and the scores against ground truth (paper section 4.1's mIoU).

Part of the torch-free boundary that tests/test_architecture.py checks.
"""
