"""Sessions: ``nox`` runs lint, tests and e2e; ``nox -s kind|cluster|benchmarks`` on demand."""

from __future__ import annotations

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests", "e2e"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
PACKAGES = ("-e", "runner", "-e", ".")
E2E_SELECTION = ("tests", "-m", "k8s or stores")


def _install(session: nox.Session, group: str) -> None:
    session.install(*PACKAGES, "--group", group)


def _pytest(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> None:
    """Run pytest. Exit code 5 (nothing collected) fails like any other non-zero code:
    a selection that matches no test is a broken selection, never a pass."""
    session.run("pytest", *args, *session.posargs, env=env or {})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (with the ASYNC rules), mypy --strict and pyright --verifytypes ascend."""
    _install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
    # Every public name's type is known to a user's type checker (100% completeness).
    session.run("pyright", "--verifytypes", "ascend", "--ignoreexternal")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit, local-backend integration and notebook tests (no cluster needed)."""
    _install(session, "test")
    _pytest(session, "tests", "-m", "not k8s and not stores")


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """The end-to-end suite against the test cluster (real kubelets, containerd, runc,
    images built from Debian packages: needs root) and the object-store emulators."""
    _install(session, "e2e")
    session.run("python", "-m", "tests.cluster", "build")
    _pytest(session, *E2E_SELECTION)


@nox.session(python=PYTHON, default=False)
def kind(session: nox.Session) -> None:
    """The same end-to-end suite against a kind cluster (needs Docker and kind on PATH)."""
    _install(session, "e2e")
    env = {"ASCEND_TEST_CLUSTER": "kind"}
    session.run("python", "-m", "tests.cluster", "kind-up", env=env)
    try:
        _pytest(session, *E2E_SELECTION)
    finally:
        session.run("python", "-m", "tests.cluster", "kind-down", env=env)


@nox.session(python=PYTHON, default=False)
def cluster(session: nox.Session) -> None:
    """``nox -s cluster -- up`` starts the test cluster and stores; ``-- down`` stops them."""
    _install(session, "e2e")
    session.run("python", "-m", "tests.cluster", *(session.posargs or ["up"]))


@nox.session(python=PYTHON, default=False)
def benchmarks(session: nox.Session) -> None:
    """Benchmarks; figures go to benchmarks/results/ (``-- local`` for one suite)."""
    _install(session, "e2e")
    session.run("python", "-m", "benchmarks", *session.posargs)
