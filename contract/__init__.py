"""What the API (``service``) and the workers (``worker``) share, so that neither imports the other.

``settings`` (every ``RIB_*`` variable), ``jobs`` (job bookkeeping in Redis) and ``tasks`` (the
Celery task names, their typed payloads and the client that queues them). Torch-free: the API
process imports all of it.
"""
