"""Module-scoped fixtures for the connection-error tests of the client and the CLI:
a set of certificates, a server with mutual TLS, and a plaintext one. Import them by
name into a test module (pytest finds imported fixtures)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.certs import CertSet, make_certs
from support.servers import ServerProcess, module_server, mtls_server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(certs: CertSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = mtls_server(certs, tmp_path_factory.mktemp("mtls"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = module_server(tmp_path_factory, "plain")
    yield server
    server.close()
