"""API keys named in the settings: an environment variable or a Prefect Secret block.

The settings hold only the NAME of where a key lives (``api_key_env`` or
``api_key_secret``), never the key. :func:`read_api_key` fetches it; its errors name the
variable or block and never the value, so a caller can put them in a log or a one-line
error as they are.
"""

from __future__ import annotations

from typing import Mapping


class KeyUnavailable(ValueError):
    """The named key cannot be read; the message names where it was looked for."""


def read_api_key(api_key_env: str | None, api_key_secret: str | None,
                 environ: Mapping[str, str]) -> str | None:
    """The key from the environment variable ``api_key_env`` (looked up in ``environ``) or
    the Prefect Secret block ``api_key_secret``; None when neither is named.

    Raises :class:`KeyUnavailable` when the variable is unset or empty, or the block cannot
    be read or is empty.
    """
    if api_key_env:
        key = (environ.get(api_key_env) or "").strip()
        if not key:
            raise KeyUnavailable(f"the environment variable {api_key_env} (api_key_env) is not set")
        return key
    if not api_key_secret:
        return None
    try:
        from prefect.blocks.system import Secret

        key = str(Secret.load(api_key_secret, _sync=True).get()).strip()
    except Exception as exc:  # noqa: BLE001 - any failure is "cannot read the block"
        raise KeyUnavailable(
            f"cannot read the Prefect Secret block '{api_key_secret}' (api_key_secret): {type(exc).__name__}"
        ) from None
    if not key:
        raise KeyUnavailable(f"the Prefect Secret block '{api_key_secret}' is empty")
    return key
