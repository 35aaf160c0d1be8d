"""Honest exit codes: what a user can fix is a ``KmjaxError`` (exit code 2, the message alone);
anything else is a bug (exit code 1, with its traceback), a plain ``ValueError`` included."""

import errno
import importlib
import inspect
import pkgutil

import jax
import numpy as np
import pytest

import kmjax
from kmjax import cli
from kmjax.cli import main
from kmjax.errors import InputError, InputTypeError, KmjaxError


def _boom(*args, **kwargs):
    raise ValueError("boom")


def test_a_plain_value_error_inside_is_a_bug_with_its_traceback(monkeypatch, capsys):
    import kmjax.experiment

    monkeypatch.setattr(kmjax.experiment, "run", _boom)
    assert main(["run", "quick", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: boom" in err and "a bug" in err
    import kmjax.experiment.report

    monkeypatch.setattr(kmjax.experiment.report, "cpu_model", _boom)
    assert main(["info"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_bad_config_value_is_exit_code_2_without_a_traceback(tmp_path, capsys):
    assert main(["run", "quick", "--set", "kmeans.k=-1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kmjax: error: ") and "kmeans.k" in err and "Traceback" not in err
    assert main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing.toml" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing was started


def test_a_damaged_run_folder_is_exit_code_2(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{not json")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "f.npz")]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "Traceback" not in err


@pytest.mark.parametrize("error, code", [
    (ValueError("inside NumPy"), 1), (TypeError("x"), 1), (KeyError("k"), 1), (RuntimeError("r"), 1),
    (InputError("bad"), 2), (kmjax.ConfigError("c"), 2), (kmjax.DataError("d"), 2), (kmjax.RunError("r"), 2),
    (FileNotFoundError(errno.ENOENT, "No such file"), 2), (OSError(errno.ENOSPC, "full"), 2),
    (OSError(errno.EIO, "I/O"), 1), (KeyboardInterrupt(), 130),
])
def test_exit_codes_of_each_kind_of_error(error, code):
    assert cli._exit_code(error) == code  # the same classification in one process and in several


def test_a_library_argument_error_is_an_input_error_and_a_value_error():
    with pytest.raises(InputError, match="add a channel axis") as e:
        kmjax.extract_patches(np.zeros((2, 8, 8), np.uint8), 3)
    assert isinstance(e.value, ValueError) and isinstance(e.value, KmjaxError)
    with pytest.raises(InputError):
        kmjax.random_crops(jax.random.key(0), np.zeros((1, 4, 4, 1)), pad=-1)
    with pytest.raises(InputError):
        kmjax.pool(np.zeros((1, 4, 4, 2)), grid=5)
    with pytest.raises(InputError):
        kmjax.load_cifar10("nowhere", split="test", batches=[1])
    with pytest.raises(InputTypeError) as e:  # a host-level function inside jit
        jax.jit(kmjax.predict_images)(None, np.zeros((1, 8, 8, 3), np.float32))
    assert isinstance(e.value, TypeError)


def test_the_checks_run_inside_jit():
    images = np.arange(2 * 6 * 6 * 1, dtype=np.float32).reshape(2, 6, 6, 1)
    out = jax.jit(lambda x: kmjax.pool(kmjax.extract_patches(x, 3), grid=2))(images)
    assert out.shape == (2, 4 * 9)
    with pytest.raises(InputError):  # shapes are known while tracing
        jax.jit(lambda x: kmjax.extract_patches(x, 3))(images[:, :, :, 0])


def _package_modules():
    for info in pkgutil.walk_packages(kmjax.__path__, "kmjax."):
        yield importlib.import_module(info.name)


def test_every_error_a_user_can_fix_is_a_kmjax_error():
    found = {}
    for module in _package_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("kmjax"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    assert {"kmjax.errors.KmjaxError", "kmjax.cli._UsageError", "kmjax.safe_pickle.RefusedPickle"} <= set(found)
    assert [n for n, cls in found.items() if not issubclass(cls, KmjaxError)] == []
    for name in ("KmjaxError", "InputError", "InputTypeError", "ConfigError", "DataError", "FileFormatError",
                 "RunError"):
        assert name in kmjax.__all__ and issubclass(getattr(kmjax, name), KmjaxError)
