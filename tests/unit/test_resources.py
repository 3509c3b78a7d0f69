import pytest

import ascend
from ascend._resources import Resources, memory_bytes


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"memory": "16GB"}, "memory='16GB' is not a memory quantity"),
        ({"memory": 16}, "must be a string"),
        ({"cpu": -1}, "cpu=-1 must be a positive"),
        ({"cpu": "two"}, "not a CPU quantity"),
        ({"gpu": 1.5}, "whole number of GPUs"),
        ({"gpu": True}, "whole number of GPUs"),
        ({"timeout": 0}, "positive number of seconds"),
        ({"retries": -1}, "whole number"),
        ({"requirements": "torch"}, "neither a list of requirements nor an existing file"),
        ({"requirements": ["torch=2.6"]}, "not a valid requirement"),
        ({"env": {"1BAD": "x"}}, "env must map"),
        ({"env": {"OK": 1}}, "env must map"),
        ({"backend": "slurm"}, "backend='slurm' is unknown"),
        ({"gpus": 1}, "unknown option 'gpus'"),
        ({"image": ""}, "non-empty"),
    ],
)
def test_bad_option_raises_config_error_naming_it(options: dict, fragment: str) -> None:
    with pytest.raises(ascend.ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        Resources.build(**options)


def test_decorator_validates_options_at_decoration_time() -> None:
    with pytest.raises(ascend.ConfigError, match="memory"):
        ascend.remote(memory="lots")


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("512Mi", 512 * 2**20),
        ("16Gi", 16 * 2**30),
        ("2G", 2 * 10**9),
        ("100", 100),
        ("1.5Gi", 3 * 2**29),
    ],
)
def test_memory_quantities_convert_to_bytes(quantity: str, expected: int) -> None:
    assert memory_bytes(quantity) == expected


def test_options_returns_a_validated_copy() -> None:
    @ascend.remote(gpu=1, memory="1Gi")
    def f() -> None: ...

    g = f.options(memory="2Gi")
    assert g.resources.memory == "2Gi" and g.resources.gpu == 1
    assert f.resources.memory == "1Gi"
    with pytest.raises(ascend.ConfigError):
        f.options(timeout=-3)


def test_remote_keeps_function_metadata() -> None:
    def documented(x: int) -> int:
        """Doubles x."""
        return 2 * x

    rf = ascend.remote(documented)
    assert rf.__wrapped__ is documented
    assert rf.__name__ == "documented" and rf.__doc__ == "Doubles x."
    assert rf.local(21) == 42


@pytest.mark.parametrize(
    ("options", "fragment"),
    [({"gpu": -1}, "whole number of GPUs"), ({"memory": "lots"}, "not a memory quantity")],
)
def test_resources_validate_on_construction_too(options: dict, fragment: str) -> None:
    with pytest.raises(ascend.ConfigError, match=fragment):
        ascend.Resources(**options)


def test_resources_normalise_on_construction() -> None:
    made = ascend.Resources(cpu=2, requirements=["numpy>=2"])  # type: ignore[arg-type]
    assert made.cpu == "2" and made.requirements == ("numpy>=2",)
