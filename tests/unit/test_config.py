from pathlib import Path

import pytest

import ascend
from ascend import _config


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_defaults_are_local_backend_and_a_user_cache_folder(isolated_ascend: Path) -> None:
    settings = _config.resolve({})
    assert settings.backend == "local"
    assert settings.storage == (isolated_ascend / "cache" / "ascend").as_uri()
    assert settings.project == "default"


def test_precedence_argument_over_env_over_pyproject_over_user_file(
    tmp_path: Path, isolated_ascend: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(
        isolated_ascend / "config" / "ascend" / "config.toml",
        'project = "from-user"\nuser = "from-user"\nnamespace = "from-user"\nimage = "from-user"\n',
    )
    _write(
        tmp_path / "pyproject.toml",
        '[tool.ascend]\nproject = "from-pyproject"\nuser = "from-pyproject"\nnamespace = "from-pyproject"\n',
    )
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # pyproject is found in a parent folder
    monkeypatch.setenv("ASCEND_PROJECT", "from-env")
    monkeypatch.setenv("ASCEND_USER", "from-env")
    settings = ascend.configure(project="from-arg")
    assert settings.project == "from-arg"
    assert settings.user == "from-env"
    assert settings.namespace == "from-pyproject"
    assert settings.image == "from-user"


def test_unknown_pyproject_key_is_an_error_with_a_suggestion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "pyproject.toml", '[tool.ascend]\nstorgae = "s3://x"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ascend.ConfigError, match="unknown setting 'storgae'. Did you mean 'storage'"
    ):
        _config.resolve({})


def test_env_values_are_parsed_and_bad_ones_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCEND_STORAGE_OPTIONS", '{"anon": true}')
    monkeypatch.setenv("ASCEND_DETACH", "yes")
    monkeypatch.setenv("ASCEND_MAX_WORKERS", "3")
    settings = _config.resolve({})
    assert settings.storage_options == {"anon": True}
    assert settings.detach is True and settings.max_workers == 3
    monkeypatch.setenv("ASCEND_DETACH", "maybe")
    with pytest.raises(ascend.ConfigError, match="ASCEND_DETACH = 'maybe' is invalid"):
        _config.resolve({})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("backend", "slurm"),
        ("project", "Has Spaces"),
        ("max_workers", 0),
        ("kubernetes_writes_per_second", 0),
        ("termination_grace", -1),
    ],
)
def test_invalid_settings_are_rejected(key: str, value: object) -> None:
    with pytest.raises(ascend.ConfigError, match=key if key != "backend" else "slurm"):
        ascend.configure(**{key: value})


def test_configure_rejects_unknown_names() -> None:
    with pytest.raises(ascend.ConfigError, match="unknown setting 'bakend'"):
        ascend.configure(bakend="local")


def test_invalid_toml_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "pyproject.toml", "[tool.ascend\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ascend.ConfigError, match="pyproject.toml is not valid TOML"):
        _config.resolve({})


def test_a_bad_boolean_names_every_accepted_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCEND_DETACH", "maybe")
    with pytest.raises(ascend.ConfigError, match=r"expected 1/0, true/false, yes/no or on/off"):
        _config.resolve({})
