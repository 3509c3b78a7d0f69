"""Integration tests run with a blocking-call detector on every event loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

# Submitting a call is synchronous and may be done from async code. Its only file I/O
# happens once per process: loading the settings and the signing key on first use.
# Opening a cloud filesystem reads the SDK's config files once per store (botocore).
# Loading a kubeconfig runs kubernetes_asyncio's loader on a loop of its own in a worker
# thread, never on ascend's loop. The uv version a build pod installs and the source of
# the runner's bootstrap and builder (the pods' commands) are read once per process.
_FIRST_USE_READS = [
    ("ascend/_environments.py", {"tool_requirement", "_source"}),
    ("ascend/_storage.py", {"_filesystem"}),
    ("ascend/backends/_kubernetes/_client.py", {"_load_configuration"}),
    ("ascend/_serialization.py", {"_load_or_create_key"}),
    ("ascend/_config.py", {"_layers", "_find_pyproject", "_read_toml"}),
]


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any blocking call that ascend's code makes on a running event loop (its own
    loop thread included), so a stray file read or sleep in the scheduler or a backend
    fails the test. Third-party loops (fsspec's I/O thread, emulator clients) are not
    ascend's to fix and are not scanned."""
    with blockbuster_ctx(["ascend", "tests.integration.test_local_backend"]) as detector:
        for function in detector.functions.values():
            for filename, names in _FIRST_USE_READS:
                function.can_block_in(filename, names)
        yield detector
