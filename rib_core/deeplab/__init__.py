"""Step 4 (paper section 3.3, 4.1 and appendix A.1): DeepLab trained on the pseudo-masks, evaluated and
used to predict, as an offline training job."""
