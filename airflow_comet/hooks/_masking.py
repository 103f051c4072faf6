"""Secrets the hook learns from a connection (the API key, a proxy's password) registered for redaction."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def mask(secret: str) -> None:
    """Register ``secret`` with Airflow's log redaction (best effort on every version)."""
    if not secret:
        return
    try:
        from airflow.providers.common.compat.sdk import mask_secret

        mask_secret(secret)
    except Exception:  # pragma: no cover - masking is defence in depth, never a reason to fail
        log.debug("Could not register a secret for masking", exc_info=True)
