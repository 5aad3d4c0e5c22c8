"""The API's routes, one module per resource: health, images (uploads), jobs, training jobs."""
