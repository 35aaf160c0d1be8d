"""Saving, loading and using a trained system; the predict / filters commands on it."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import kmjax
from kmjax.cli import main
from kmjax.model import Model, load, predict_images, save


@pytest.fixture(scope="module")
def trained():
    """A small system trained on random 12x12 images with two classes (bright vs dark)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    images = (rng.integers(0, 120, (60, 12, 12, 3)) + 120 * labels[:, None, None, None]).astype(np.uint8)
    key = jax.random.key(0)
    spec = kmjax.FeatureSpec(patch_size=4, eps_norm=None)  # keep brightness: it is the signal here
    patches = kmjax.sample_patches(key, images, 2000, 4)
    zca = kmjax.fit_zca(np.asarray(patches, np.float32), 0.1)
    km = kmjax.kmeans(key, kmjax.apply_zca(zca, patches), 8, max_iter=10)
    feats = kmjax.extract_features(images, km.centroids, zca, spec)
    std = kmjax.fit_standardizer(feats)
    clf, _ = kmjax.train_linear(kmjax.standardize(std, feats), labels, num_classes=2, C=1.0)
    model = Model(spec, zca, km.centroids, std, clf, ("dark", "bright"), (12, 12, 3))
    return model, images, labels


def test_save_load_round_trip_gives_the_same_predictions(trained, tmp_path):
    model, images, labels = trained
    path = save(tmp_path / "model.npz", model)
    loaded = load(path)
    assert loaded.spec == model.spec and loaded.class_names == model.class_names
    np.testing.assert_array_equal(np.asarray(loaded.centroids), np.asarray(model.centroids))
    np.testing.assert_array_equal(predict_images(loaded, images), predict_images(model, images))
    assert (predict_images(model, images) == labels).mean() > 0.9  # the toy task is learned
    assert not list(tmp_path.glob("*.tmp"))
    with np.load(path, allow_pickle=False) as z:  # plain arrays + JSON, readable without pickle
        assert json.loads(str(z["__meta__"]))["format_version"] == 2
        assert {"centroids", "zca/mean", "standardizer/scale", "classifier/weights"} <= set(z.files)
    assert save(tmp_path / "again.npz", model).read_bytes() == path.read_bytes()  # deterministic bytes


def _damaged(trained, tmp_path, how):
    """A model.npz damaged in one way; returns its path."""
    model, _, _ = trained
    path = save(tmp_path / "model.npz", model)
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupted":  # bytes flipped inside the weights' data: the zip CRC catches it
        i = data.index(b"classifier/weights.npy") + 200  # past its local header and .npy header
        path.write_bytes(data[:i] + bytes(b ^ 0xFF for b in data[i : i + 32]) + data[i + 32 :])
    elif how == "missing-key":
        kmjax.checkpoint.save_tree(path, {"centroids": np.asarray(model.centroids)}, kmjax.checkpoint.read_meta(path))
    elif how == "wrong-shape":
        kmjax.save(path, model._replace(classifier=kmjax.LinearModel(np.zeros((7, 2), np.float32))))
    elif how == "nan-weights":
        w = np.asarray(model.classifier.weights).copy()
        w[0, 0] = np.nan
        kmjax.save(path, model._replace(classifier=kmjax.LinearModel(w)))
    elif how == "not-a-model":
        np.savez(path, a=np.zeros(3))
    return path


DAMAGE = {"empty": "truncated or corrupt", "truncated": "truncated or corrupt", "corrupted": "unreadable",
          "missing-key": "has no array 'zca/mean'", "wrong-shape": "expected 33",
          "nan-weights": "'classifier/weights' holds NaN", "not-a-model": "has no array '__meta__'"}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_model_files_are_clear_errors(trained, tmp_path, capsys, how):
    path = _damaged(trained, tmp_path, how)
    with pytest.raises(kmjax.FileFormatError, match=DAMAGE[how]) as e:
        load(path)
    assert str(path) in str(e.value)
    for cmd in (["predict", str(path), str(tmp_path / "x.npy")], ["filters", str(path)]):
        np.save(tmp_path / "x.npy", trained[1][:1])
        assert main(cmd) == 2
        assert DAMAGE[how].split("'")[0] in capsys.readouterr().err


def test_load_of_a_missing_file(tmp_path):
    with pytest.raises(kmjax.FileFormatError, match="does not exist"):
        load(tmp_path / "missing.npz")


def test_a_nan_image_is_refused(trained, capsys, tmp_path):
    model, images, _ = trained
    bad = images[:3].astype(np.float32)
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN or Inf values, in 1 of 3 images \\(the first: index 1\\)"):
        predict_images(model, bad)
    path = save(tmp_path / "model.npz", model)
    np.save(tmp_path / "bad.npy", bad)
    assert main(["predict", str(path), str(tmp_path / "bad.npy")]) == 2
    assert "NaN" in capsys.readouterr().err


def test_predict_images_checks_the_shape(trained):
    model, images, _ = trained
    assert predict_images(model, images[0]).shape == (1,)  # one (H, W, C) image
    with pytest.raises(ValueError, match=r"\(N, 12, 12, 3\)"):
        predict_images(model, images[:, :10])


def test_cli_predict_on_png_jpeg_npy_and_grayscale(trained, tmp_path, capsys):
    model, images, labels = trained
    path = save(tmp_path / "model.npz", model)
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    Image.fromarray(images[1]).save(tmp_path / "b.jpg", quality=100)
    Image.fromarray(images[2].mean(-1).astype(np.uint8)).save(tmp_path / "gray.png")  # 1 channel
    np.save(tmp_path / "batch.npy", images[:4])
    assert main(["predict", str(path), str(tmp_path / "a.png"), str(tmp_path / "b.jpg"),
                 str(tmp_path / "gray.png"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out[:1]] == [model.class_names[labels[0]]]
    assert len(out) == 3 and all(r["name"] in model.class_names for r in out)
    assert main(["predict", str(path), str(tmp_path / "batch.npy")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith(f"{tmp_path / 'batch.npy'}[0]")


def test_cli_predict_errors_are_exit_code_2(trained, tmp_path, capsys):
    model, images, _ = trained
    path = save(tmp_path / "model.npz", model)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["predict", str(path), str(tmp_path / "broken.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(tmp_path / "big.png")
    assert main(["predict", str(path), str(tmp_path / "big.png")]) == 2
    assert "--resize" in capsys.readouterr().err
    assert main(["predict", str(path), str(tmp_path / "big.png"), "--resize"]) == 0
    assert main(["predict", str(tmp_path / "missing.npz"), str(tmp_path / "big.png")]) == 2


def test_cli_filters_draws_the_dictionary(trained, tmp_path):
    model, _, _ = trained
    save(tmp_path / "model.npz", model)
    assert main(["filters", str(tmp_path), "--out", str(tmp_path / "f.png")]) == 0
    assert Image.open(tmp_path / "f.png").size[0] > 50
    assert main(["filters", str(tmp_path / "nothing")]) == 2


def test_cli_info_and_help(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "jax" in out and "CPU: " in out
    for cmd in ("run", "sweep", "export", "bench", "filters", "predict", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
