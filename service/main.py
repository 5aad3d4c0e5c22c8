"""``service.main:app``: the API for the ``RIB_*`` environment, as uvicorn serves it (``create_app`` is in
:mod:`service.app`)."""

from __future__ import annotations

from service.app import create_app

app = create_app()
