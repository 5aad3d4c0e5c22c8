"""``GET /v1/webhooks/secret``: the secret a caller's callbacks are signed with (:mod:`contract.webhooks`)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from contract.webhooks import signing_secret
from service.deps import Owner, SettingsDep
from service.errors import error_responses
from service.schemas import example

router = APIRouter(tags=["webhooks"])


class WebhookSecret(BaseModel):
    model_config = example({"secret": "9b1c...e4", "signature": "X-RIB-Signature = 'sha256=' + hex HMAC-SHA256(...)"})

    secret: str = Field(description="HMAC-SHA256 key of X-RIB-Signature for this API key's jobs")
    signature: str = Field(description="how the signature is made")


@router.get("/webhooks/secret", response_model=WebhookSecret, responses=error_responses(404))
def webhook_secret(owner: Owner, settings: SettingsDep) -> WebhookSecret:
    """Your receiver checks each callback with this secret: it is derived from the server's secret and
    your API key, so no other key's jobs can sign a callback to you."""
    if settings.webhook_secret is None:
        raise HTTPException(404, "this server sends no callbacks: RIB_WEBHOOK_SECRET is not set")
    return WebhookSecret(secret=signing_secret(settings.webhook_secret.get_secret_value(), owner),
                         signature="X-RIB-Signature = 'sha256=' + hex HMAC-SHA256(secret, "
                                   "X-RIB-Timestamp + '.' + body)")
