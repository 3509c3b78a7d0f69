"""One pass of the expired-session reaper: ``python -m ascend._cli._reaper`` (the
CronJob of ``ascend admin reaper --manifest`` runs this in the namespace it reaps)."""

from __future__ import annotations

from ascend import _config


async def reap_once(settings: _config.Settings) -> list[str]:
    """Delete the expired session Leases of the settings' namespace; their names."""
    from ascend.backends._kubernetes._client import Api
    from ascend.backends._kubernetes._session import reap_expired

    api = await Api.connect(settings)
    try:
        return await reap_expired(api, settings.namespace or "default")
    finally:
        await api.close()


def main() -> None:
    import anyio

    settings = _config.resolve({"backend": "kubernetes"})
    for name in anyio.run(reap_once, settings):
        print(f"deleted expired session {name}")


if __name__ == "__main__":
    main()
