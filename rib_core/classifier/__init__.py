"""Step 1 of the chain (paper sections 3.1 and 4.1): the multi-label classifier trained on image-level
labels, its quality, and its class activation maps (CAM), the baseline RIB improves."""
