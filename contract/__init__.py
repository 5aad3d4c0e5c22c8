"""What the API (``service``) and the workers (``worker``) share, so that neither imports the other.

``settings`` (every ``RIB_*`` variable), ``pipelines`` (every job's state in Redis, one store for
image, pipeline and training jobs), ``stages`` (the stage registry: each stage's task and queue)
and ``tasks`` (the Celery app's configuration and the client that queues tasks). Torch-free: the
API process imports all of it.
"""
