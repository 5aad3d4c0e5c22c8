"""RIB: Reducing Information Bottleneck for weakly supervised semantic segmentation.

The algorithm library. Every stage (classifier training, CAM, RIB, refinement, DeepLab,
evaluation) can be called from a notebook; nothing here imports the service or the workers.
"""

__version__ = "0.1.0"
