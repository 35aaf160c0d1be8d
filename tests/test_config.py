"""Tests for kmjax.config: defaults, schema validation, TOML loading and overrides."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from kmjax.config import Config, ConfigError, apply_overrides, load_config, parse_config, to_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_the_authors_settings():
    cfg = parse_config({})
    assert cfg == Config()
    assert cfg.kmeans.k == 1600
    assert cfg.patches.size == 6
    assert cfg.patches.num == 400_000
    assert cfg.preprocess.eps_norm == 10.0
    assert cfg.preprocess.eps_zca == 0.1
    assert cfg.preprocess.whiten is True
    assert cfg.kmeans.max_iter == 50
    assert cfg.classifier.C == 100.0
    assert cfg.classifier.loss == "svm"
    assert cfg.features.encoder == "triangle"
    assert cfg.features.grid == 2 and cfg.features.pool == "sum" and cfg.features.stride == 1
    assert cfg.data.train_batches == [1, 2, 3, 4, 5]


def test_partial_section_keeps_other_defaults():
    cfg = parse_config({"kmeans": {"k": 400}})
    assert cfg.kmeans.k == 400 and cfg.kmeans.max_iter == 50 and cfg.patches.size == 6


def test_misspelled_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        parse_config({"kmeans": {"kk": 1}})
    msg = str(e.value)
    assert "kmeans.kk" in msg
    valid = msg.split("valid keys")[1]
    assert "k," in valid and "max_iter" in valid and "init" in valid


def test_misspelled_section():
    with pytest.raises(ConfigError) as e:
        parse_config({"kmean": {"k": 1}})
    msg = str(e.value)
    assert "kmean" in msg and "kmeans" in msg and "classifier" in msg


def test_section_must_be_table():
    with pytest.raises(ConfigError, match="kmeans"):
        parse_config({"kmeans": 5})


def test_a_registered_encoder_is_a_valid_config_value(monkeypatch):
    # the vocabularies are defined once, beside the functions: registering an encoder is the one edit
    from kmjax import encoders
    from kmjax.features import FeatureSpec, feature_dim

    with pytest.raises(ConfigError, match="unknown features.encoder 'cube'"):
        parse_config({"features": {"encoder": "cube"}})
    monkeypatch.setitem(encoders.ENCODERS, "cube", encoders.Encoder(lambda x, c, alpha, precision: x @ c.T, 3))
    assert parse_config({"features": {"encoder": "cube"}}).features.encoder == "cube"
    assert feature_dim(FeatureSpec(encoder="cube"), 10) == 4 * 3 * 10


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"kmeans\.k"):
        parse_config({"kmeans": {"k": "many"}})


def test_float_for_int_field_rejected():
    with pytest.raises(ConfigError, match=r"kmeans\.k"):
        parse_config({"kmeans": {"k": 1600.0}})


def test_int_accepted_for_float_field():
    cfg = parse_config({"classifier": {"C": 10}, "preprocess": {"eps_norm": 0}})
    assert cfg.classifier.C == 10.0 and isinstance(cfg.classifier.C, float)
    assert isinstance(cfg.preprocess.eps_norm, float)


@pytest.mark.parametrize("section,key", [("kmeans", "k"), ("data", "n_train"), ("classifier", "C")])
def test_bool_rejected_for_number_field(section, key):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        parse_config({section: {key: True}})


def test_int_rejected_for_bool_field():
    with pytest.raises(ConfigError, match=r"preprocess\.whiten"):
        parse_config({"preprocess": {"whiten": 1}})


@pytest.mark.parametrize("section,key,value", [
    ("features", "encoder", "tri"), ("features", "pool", "mean"), ("classifier", "loss", "hinge"),
    ("kmeans", "init", "kmeans++"), ("patches", "sampling", "dense"),
])
def test_value_outside_choices_lists_choices(section, key, value):
    with pytest.raises(ConfigError) as e:
        parse_config({section: {key: value}})
    msg = str(e.value)
    assert f"{section}.{key}" in msg and repr(value) in msg
    if key == "encoder":
        assert "triangle" in msg and "hard" in msg and "soft_threshold" in msg


@pytest.mark.parametrize("section,key,value", [
    ("kmeans", "k", 0), ("kmeans", "k", -5), ("patches", "size", 0), ("features", "grid", 0),
    ("classifier", "C", 0.0), ("classifier", "C", -1.0),
])
def test_non_positive_rejected(section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key} must be a number > 0"):
        parse_config({section: {key: value}})


def test_kmeans_max_iter_zero_means_the_init_is_the_dictionary():
    assert parse_config({"kmeans": {"max_iter": 0}}).kmeans.max_iter == 0
    with pytest.raises(ConfigError, match="kmeans.max_iter must be >= 0"):
        parse_config({"kmeans": {"max_iter": -1}})


def test_classifier_storage_values():
    assert parse_config({"classifier": {"storage": "bfloat16"}}).classifier.storage == "bfloat16"
    with pytest.raises(ConfigError, match="unknown classifier.storage 'float16'"):
        parse_config({"classifier": {"storage": "float16"}})
    # ridge ignores it (a sweep of a bfloat16 config over the losses stays valid)
    assert parse_config({"classifier": {"loss": "ridge", "storage": "bfloat16"}}).classifier.storage == "bfloat16"


@pytest.mark.parametrize("batches", [[0], [6], [], [1, 7], [1.0]])
def test_bad_train_batches(batches):
    with pytest.raises(ConfigError, match="train_batches"):
        parse_config({"data": {"train_batches": batches}})


def test_bool_in_train_batches_rejected():
    with pytest.raises(ConfigError, match="train_batches"):
        parse_config({"data": {"train_batches": [True]}})


def test_bool_in_c_grid_rejected():
    with pytest.raises(ConfigError, match="C_grid"):
        parse_config({"classifier": {"C_grid": [True]}})


def test_train_batches_subset_accepted():
    assert parse_config({"data": {"train_batches": [5, 1]}}).data.train_batches == [5, 1]


@pytest.mark.parametrize("frac", [1.5, 0.0, 1.0, -0.1])
def test_bad_val_fraction(frac):
    with pytest.raises(ConfigError, match="val_fraction"):
        parse_config({"classifier": {"val_fraction": frac}})


@pytest.mark.parametrize("grid", [[0], [-1.0], ["10"]])
def test_bad_c_grid(grid):
    with pytest.raises(ConfigError, match="C_grid"):
        parse_config({"classifier": {"C_grid": grid}})


def test_negative_counts_and_eps():
    with pytest.raises(ConfigError, match="n_train"):
        parse_config({"data": {"n_train": -1}})
    parse_config({"data": {"n_test": -1}})  # -1 means no test set: allowed
    with pytest.raises(ConfigError, match="n_test"):
        parse_config({"data": {"n_test": -2}})
    with pytest.raises(ConfigError, match="eps_zca"):
        parse_config({"preprocess": {"eps_zca": -0.1}})


# ---------------------------------------------------------------- files and overrides


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('seed = 3\n[kmeans]\nk = 100\nmax_iter = 7\n[features]\nencoder = "triangle"\n')
    cfg = load_config(path, ["kmeans.k=400", "features.encoder=hard", "classifier.C_grid=[1, 10]",
                             "preprocess.whiten = false"])
    assert cfg.name == "exp"  # the file's stem when the file has no name
    assert cfg.seed == 3
    assert cfg.kmeans.k == 400 and cfg.kmeans.max_iter == 7  # override replaces only its key
    assert cfg.features.encoder == "hard"  # a bare word is a string
    assert cfg.classifier.C_grid == [1, 10]
    assert cfg.preprocess.whiten is False
    # without overrides: the file's values
    plain = load_config(str(path))
    assert plain.kmeans.k == 100 and plain.features.encoder == "triangle"


def test_load_config_keeps_explicit_name(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('name = "mine"\n')
    assert load_config(path).name == "mine"
    assert load_config(path, ["name=other"]).name == "other"


def test_override_errors(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["kmeans.k"])
    with pytest.raises(ConfigError, match=r"kmeans\.kk"):
        load_config(path, ["kmeans.kk=3"])
    with pytest.raises(ConfigError, match=r"kmeans\.k"):
        load_config(path, ["kmeans.k=lots"])
    with pytest.raises(ConfigError, match="not a table"):
        load_config(path, ["name.x=1"])


def test_apply_overrides_does_not_mutate_input():
    values = {"kmeans": {"k": 10}}
    out = apply_overrides(values, ["kmeans.k=20", "features.grid=3"])
    assert values == {"kmeans": {"k": 10}}
    assert out == {"kmeans": {"k": 20}, "features": {"grid": 3}}


def test_invalid_toml_mentions_path(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[kmeans\nk = \n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_to_dict_round_trip():
    for cfg in (Config(), parse_config({"name": "x", "seed": 4, "kmeans": {"k": 50, "init": "k-means++"},
                                        "classifier": {"C_grid": [0.5, 2], "loss": "logistic"},
                                        "data": {"train_batches": [2, 3]}})):
        d = to_dict(cfg)
        assert isinstance(d, dict) and isinstance(d["kmeans"], dict)
        assert d["kmeans"]["k"] == cfg.kmeans.k
        assert parse_config(d) == cfg


@pytest.mark.parametrize("path", sorted(glob.glob(str(CONFIG_DIR / "*.toml"))), ids=lambda p: Path(p).name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert parse_config(to_dict(cfg)) == cfg


def test_shipped_configs_are_the_configs_folder():
    from kmjax.config import shipped_configs

    assert set(shipped_configs()) == {Path(p).stem for p in glob.glob(str(CONFIG_DIR / "*.toml"))}
    assert {"quick", "coates2011_triangle_1600", "seed"} <= set(shipped_configs())


def test_shipped_configs_of_other_data_sets():
    from kmjax.experiment.plan import feature_spec
    from kmjax.features import check_pooling
    from kmjax.symmetry import check_mirror_symmetric

    stl = load_config("stl10_triangle_1600")
    assert (stl.data.dataset, stl.data.fold, stl.data.dictionary_split) == ("stl10", 0, "unlabeled")
    assert (stl.kmeans.k, stl.features.encoder, stl.features.grid) == (1600, "triangle", 2)
    check_pooling(feature_spec(stl), (96, 96, 3))  # STL-10's own size
    c100 = load_config("cifar100_omp1_soft_8000_closed_pool3_flip")
    best = load_config("omp1_soft_8000_closed_pool3_flip")
    assert (c100.data.dataset, c100.data.labels) == ("cifar100", "fine")
    assert to_dict(c100) | {"name": "", "data": {}} == to_dict(best) | {"name": "", "data": {}}  # the recipe
    check_mirror_symmetric(feature_spec(c100), (32, 32, 3))


def test_tol_and_chunk_size_say_none_and_auto_in_words():
    from kmjax.dictionary import AUTHORS
    from kmjax.experiment.plan import dictionary_options

    cfg = parse_config({})
    assert cfg.kmeans.tol == "none" and cfg.kmeans.chunk_size == "auto"  # the authors' None: TOML has no null
    options = dictionary_options(cfg)
    assert options["tol"] is None is AUTHORS["tol"] and options["chunk_size"] is None is AUTHORS["chunk_size"]
    cfg = parse_config({"kmeans": {"tol": 1e-4, "chunk_size": 512}})
    assert dictionary_options(cfg)["tol"] == 1e-4 and dictionary_options(cfg)["chunk_size"] == 512
    assert parse_config({"kmeans": {"tol": 0}}).kmeans.tol == 0.0  # stop at a fixed point
    # the spellings before the words (a negative tol, chunk_size 0) still mean them, and resolve to them
    old = parse_config({"kmeans": {"tol": -1.0, "chunk_size": 0}})
    assert old == parse_config({"kmeans": {"tol": "none", "chunk_size": "auto"}}) == parse_config({})
    assert to_dict(old)["kmeans"]["tol"] == "none"
    for key, value, message in [("tol", "off", "kmeans.tol must be a number >= 0 or 'none', got 'off'"),
                                ("tol", True, "kmeans.tol must be a number >= 0 or 'none'"),
                                ("chunk_size", -3, "kmeans.chunk_size must be an integer >= 1 or 'auto', got -3"),
                                ("chunk_size", 2.5, "kmeans.chunk_size must be an integer >= 1 or 'auto'"),
                                ("chunk_size", "none", "kmeans.chunk_size must be an integer >= 1 or 'auto'")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_config({"kmeans": {key: value}})


def test_the_classifier_defaults_are_fit_classifiers():
    import inspect

    from kmjax.classify import ClassifierSpec, fit_classifier
    from kmjax.experiment.plan import classifier_spec

    defaults = ClassifierSpec._field_defaults
    signature = inspect.signature(fit_classifier).parameters
    assert all(signature[name].default == default for name, default in defaults.items())
    section = to_dict(parse_config({}))["classifier"]
    assert {k: v for k, v in defaults.items() if k in section} == {k: (tuple(v) if k == "C_grid" else v)
                                                                   for k, v in section.items()}
    assert classifier_spec(parse_config({})) == ClassifierSpec()
    ridge = classifier_spec(parse_config({"classifier": {"loss": "ridge", "storage": "bfloat16", "C_grid": [1, 10]}}))
    assert ridge.storage == "float32" and ridge.C_grid == (1.0, 10.0)  # ridge sums the features as they are
    flips = {"features": {"train_flip": True, "test_flip": True}}
    assert classifier_spec(parse_config(flips)).mirror_scoring
