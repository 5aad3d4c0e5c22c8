"""Step 2 (paper section 3.2): RIB. Each image's copy of the classifier is fine-tuned to reduce the
information bottleneck, and the CAMs of every iteration are aggregated into the localization map M."""
