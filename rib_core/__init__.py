"""RIB: Reducing Information Bottleneck for weakly supervised semantic segmentation.

The algorithm library, one package per step of the paper's chain: ``classifier`` (CAM), ``rib``
(section 3.2), ``refine`` (section 3.3, IRN), ``deeplab``; ``jobs`` runs the chain as the service
does, ``experiments`` holds the studies around it, and ``config``, ``data`` and ``io`` are the
torch-free part the API imports (docs/ARCHITECTURE.md). Every stage can be called from a notebook;
nothing here imports the service or the workers.
"""

__version__ = "0.1.0"
