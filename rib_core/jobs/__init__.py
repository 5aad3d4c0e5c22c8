"""The chain as the service runs it: one image through RIB and refinement (the image worker's
pipeline), and one data set stage by stage (the pipeline job's stage functions)."""
