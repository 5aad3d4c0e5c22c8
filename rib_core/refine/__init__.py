"""Step 3 (paper section 3.3, with IRN): from localization maps to pseudo-masks. Seed + dense CRF,
confident labels, IRN trained on them and its random walk, and the optional saliency veto (RIB-Sal)."""
