"""Classifier specs (Hydra ``_target_``), recipes, the fit key and the classifier search grouped by image.

Everything but the last test runs without Prefect: config validation, real scikit-learn fits and skops files
on small feature stores.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from storage import features as fstore
from tasks.config import ConfigError, dump_yaml, validate_config
from tasks.model.config import TrainFlowConfig

SCALER = {"_target_": "sklearn.preprocessing.StandardScaler"}
PIPE = {
    "_target_": "sklearn.pipeline.Pipeline",
    "steps": [
        ["scaler", SCALER],
        ["clf", {"_target_": "sklearn.linear_model.LogisticRegression", "max_iter": 500, "class_weight": "balanced"}],
    ],
}


def _cfg(data: Path | str = "data", **sections) -> TrainFlowConfig:
    return validate_config(TrainFlowConfig, {"datamodule": {"data_path": str(data)}, **sections})


def _refused(raw: dict, *needles: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(TrainFlowConfig, {"datamodule": {"data_path": "data"}, **raw})
    msg = str(err.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _store(path: Path, labels: np.ndarray, ids: list[str], dim: int = 6, seed: int = 0) -> str:
    """A complete feature store: class-dependent Gaussian features with the given row ids."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(labels), dim)).astype(np.float32) + 1.5 * labels[:, None].astype(np.float32)
    fstore.create_store(path, len(labels), dim, {"kind": "train"})
    fstore.write_feature_rows(path, 0, x)
    fstore.write_row_meta(path, labels.astype(np.int16), ids, np.full((len(labels), 4), -1))
    fstore.mark_complete(path, fstore.store_digest(path))
    return str(path)


# ============================================================================ specs and their validation


def test_pipeline_spec_builds_seeds_and_round_trips() -> None:
    from tasks.model.fit import make_classifier

    cfg = _cfg(model=PIPE, core={"seed": 7})
    est = make_classifier(cfg)
    assert type(est).__name__ == "Pipeline" and [type(s) for s in est.steps] == [tuple, tuple]
    assert est.named_steps["clf"].random_state == 7 and est.named_steps["clf"].class_weight == "balanced"
    dumped = cfg.model_dump(mode="json")
    assert dumped["model"]["_target_"] == "sklearn.pipeline.Pipeline" and "spec" not in dumped["model"]
    assert TrainFlowConfig.model_validate(dumped) == cfg  # config_resolved.yaml reads back the same
    assert "_target_: sklearn.pipeline.Pipeline" in dump_yaml(cfg)
    # make_pipeline with positional _args_, an explicit random_state kept
    spec = {
        "_target_": "sklearn.pipeline.make_pipeline",
        "_args_": [{"_target_": "sklearn.ensemble.RandomForestClassifier", "n_estimators": 3, "random_state": 1}],
    }
    assert make_classifier(_cfg(model=spec)).steps[0][1].random_state == 1


def test_shorthand_kept_and_seeded() -> None:
    from tasks.model.fit import make_classifier

    cfg = _cfg(model={"classifier": "sklearn.linear_model.LogisticRegression", "params": {"C": 0.5}})
    est = make_classifier(cfg)
    assert type(est).__name__ == "LogisticRegression" and est.C == 0.5 and est.random_state == 42
    assert cfg.model_dump(mode="json")["model"] == {
        "classifier": "sklearn.linear_model.LogisticRegression",
        "params": {"C": 0.5},
        "trusted_types": [],
    }
    colon = _cfg(model={"classifier": "sklearn.naive_bayes:GaussianNB", "params": {}})
    assert type(make_classifier(colon)).__name__ == "GaussianNB"


def test_estimators_without_predict_proba_are_refused_when_the_config_is_read() -> None:
    _refused({"model": {"_target_": "sklearn.svm.SVC"}}, "model: sklearn.svm.SVC has no predict_proba", "probability")
    _cfg(model={"_target_": "sklearn.svm.SVC", "probability": True})  # accepted
    linear_last = {
        "_target_": "sklearn.pipeline.Pipeline",
        "steps": [
            ["s", {"_target_": "sklearn.preprocessing.StandardScaler"}],
            ["c", {"_target_": "sklearn.svm.LinearSVC"}],
        ],
    }
    _refused({"model": linear_last}, "model: sklearn.pipeline.Pipeline", "last step LinearSVC has no predict_proba")
    _refused({"model": {"classifier": "sklearn.svm.LinearSVC"}}, "model: sklearn.svm.LinearSVC", "predict_proba")
    _refused({"model": {"_target_": "sklearn.preprocessing.StandardScaler"}}, "StandardScaler has no predict_proba")
    msg = _refused({"model": {"_target_": "sklearn.linear_model.Nope"}}, "model: cannot build", "Nope")
    assert "HYDRA_FULL_ERROR" not in msg and len(msg.splitlines()) == 2
    _refused({"model": {"_target_": "sklearn.linear_model.LogisticRegression", "bad_arg": 1}}, "bad_arg")
    _refused({"model": {"_target_": "sklearn.svm.SVC", "classifier": "x"}}, "'model'", "either _target_ or classifier")
    _refused({"model": {"clasifier": "x"}}, "unknown key 'model.clasifier'", "did you mean 'classifier'")


def test_pipeline_persists_with_skops(tmp_path: Path, demo_patch_dataset: Path) -> None:
    """A fitted pipeline is a skops file the train flow loads back with its spec's classes trusted (no pickle)."""
    from storage.classifier import untrusted_types
    from tasks.model.fit import fit_classifier, load_fitted

    labels = np.arange(60) % 3
    store = _store(tmp_path / "f.zarr", labels, [f"im{i % 12}_good.h5#{i}" for i in range(60)])
    cfg = _cfg(demo_patch_dataset, model=PIPE)
    fit_classifier(cfg, [store], tmp_path / "pipe.skops")
    assert untrusted_types(path=tmp_path / "pipe.skops") == []
    est = load_fitted(cfg, tmp_path / "pipe.skops")
    assert type(est).__name__ == "Pipeline" and est.predict_proba(np.zeros((2, 6), np.float32)).shape == (2, 3)


# ================================================================================= recipes


def test_recipe_presets_fill_only_unset_keys() -> None:
    default = _cfg()
    assert default.recipe == "patchflow" and default.model.target_spec()["_target_"] == "sklearn.pipeline.Pipeline"
    assert default.search.grid["clf__C"] == [0.01, 0.03, 0.1, 0.3, 1.0, 3.0] and not default.search.enabled
    quadra = _cfg(recipe="quadra")
    assert quadra.model_dump(mode="json")["model"] == {
        "classifier": "sklearn.linear_model.LogisticRegression",
        "params": {"max_iter": 10000},
        "trusted_types": [],
    }
    assert set(quadra.search.grid) == {"C", "class_weight"}  # the grid of the recipe's model
    assert "recipe: quadra" in dump_yaml(quadra)
    # the reference's samples and feature vector; patchflow's: train-split grid patches and multi-scale features
    assert quadra.trainer.grid_patches is False and quadra.backbone.feature_layers == "final"
    assert default.trainer.grid_patches is True and default.backbone.feature_layers == "multiscale"
    assert _cfg(recipe="quadra", backbone={"pooling": "avg+max"}).backbone.feature_layers == "final"
    assert _cfg(recipe="quadra", trainer={"grid_patches": True}).trainer.grid_patches is True
    # explicit keys win; trusted_types alone keeps the recipe's model; the user's own model keeps the default grid
    mine = _cfg(recipe="quadra", model=PIPE, trainer={"iteration_over_training": 3})
    assert mine.model.target_spec() == PIPE and mine.trainer.iteration_over_training == 3
    assert set(mine.search.grid) == {"clf__C", "clf__class_weight"}
    trusted = _cfg(recipe="quadra", model={"trusted_types": ["x.Y"]})
    assert trusted.model.classifier.endswith("LogisticRegression") and trusted.model.trusted_types == ["x.Y"]
    grid = _cfg(recipe="quadra", search={"grid": {"C": [1.0]}})
    assert grid.search.grid == {"C": [1.0]}
    _refused({"recipe": "reference"}, "'recipe'", "'patchflow' or 'quadra'")


def test_search_grid_is_checked_against_the_model() -> None:
    _cfg(search={"enabled": True})  # the default grid fits the default pipeline
    _refused(
        {"recipe": "quadra", "model": {"params": {"max_iter": 100}}, "search": {"enabled": True}},
        "search.grid: 'clf__C' is not a parameter of the model LogisticRegression",
    )
    _refused({"search": {"enabled": True, "grid": {"C": [1.0]}}}, "'C' is not a parameter", "did you mean clf__C")
    _refused({"search": {"enabled": True, "grid": {"clf__C": []}}}, "search.grid.clf__C: give at least one value")
    _refused(
        {"search": {"enabled": True, "grid": {"clf": [{"_target_": "sklearn.svm.LinearSVC"}]}}},
        "search.grid.clf=",
        "has no predict_proba",
    )
    _refused({"search": {"folds": 1}}, "'search.folds'")


# ========================================================================================== fit key


_USER_MODULE = textwrap.dedent(
    """
    from sklearn.linear_model import LogisticRegression


    class TunedLR(LogisticRegression):
        '''A classifier class from the user's own module.'''
    """
)


def test_fit_key_holds_the_user_module_digest(tmp_path: Path, monkeypatch) -> None:
    from tasks.model.spec import user_module_digests
    from tasks.model.stage import fit_key, search_key

    (tmp_path / "userclf_search.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    stores = ["features/aaaa.zarr", "features/bbbb.zarr"]
    cfg = _cfg(model={"_target_": "userclf_search.TunedLR", "max_iter": 200})
    key = fit_key(cfg, stores)
    from tasks.model.fit import make_classifier

    assert list(user_module_digests(make_classifier(cfg), cfg.model.target_spec())) == ["userclf_search"]
    (tmp_path / "userclf_search.py").write_text(_USER_MODULE + "\n# tuned differently\n")
    assert fit_key(cfg, stores) != key  # an edit of the user's class refits
    assert fit_key(cfg, stores) == fit_key(cfg, list(reversed(stores)))
    # scikit-learn's own classes bring no digest; the key moves with the model config and the seed only
    plain = _cfg(model=PIPE)
    assert user_module_digests(make_classifier(plain), plain.model.target_spec()) == {}
    assert fit_key(plain, stores) != fit_key(_cfg(model=PIPE, core={"seed": 1}), stores)
    # the search's key has the grid, folds and metric, not n_jobs; a chosen setting changes the fit key
    on = _cfg(model=PIPE, search={"enabled": True})
    assert search_key(on, stores) == search_key(_cfg(model=PIPE, search={"enabled": True, "n_jobs": 1}), stores)
    assert search_key(on, stores) != search_key(_cfg(model=PIPE, search={"enabled": True, "folds": 5}), stores)
    choice = {"setting": {"clf__C": 0.1}}
    assert fit_key(on, stores, choice) != fit_key(on, stores)


# ===================================================================================== grouped CV


def test_rows_are_grouped_by_source_image() -> None:
    from tasks.model.search import grouped_folds, image_groups, image_of

    stems = {"im_1", "im_10", "tile_a_b"}
    assert image_of("im_1_good.h5#3", stems) == "im_1"
    assert image_of("im_10_2.h5#0", stems) == "im_10"
    assert image_of("tile_a_b_7.png", stems) == "tile_a_b"
    assert image_of("#DISCARD#tile_a_b_0.png", stems) == "tile_a_b"
    assert image_of("train/bg/im_1_3.png", stems) == "im_1"
    assert image_of("original/images/tile_a_b.png#2", stems) == "tile_a_b"  # a row naming its image
    ids = [f"im_{i % 7}_{'good' if i % 2 else i % 3}.h5#{i}" for i in range(70)] + [
        f"im_{i}_{i % 4}.png" for i in range(7)
    ]
    groups = image_groups(ids, {f"im_{i}" for i in range(7)})
    assert len(np.unique(groups)) == 7
    names = np.array([image_of(s) for s in ids])
    for train, test in grouped_folds(groups, 5).split(np.zeros(len(ids)), groups=groups):
        assert not set(names[train]) & set(names[test])  # no image in both parts of a fold
    with pytest.raises(ConfigError, match="search.folds 8 needs at least 8 training images"):
        grouped_folds(groups, 8)


def test_search_scores_every_setting_and_the_fit_uses_the_choice(tmp_path: Path, demo_patch_dataset: Path) -> None:
    from tasks.model.fit import fit_classifier, load_fitted
    from tasks.model.search import image_of, run_search, search_choice

    info = json.loads((demo_patch_dataset / "info.json").read_text())
    stems = [Path(e["image_path"]).stem for e in info["train_files"]]
    n = 24 * len(stems)
    labels = np.arange(n) % 3
    ids = [f"{stems[i % len(stems)]}_{'good' if labels[i] == 0 else 1}.h5#{i}" for i in range(n)]
    stores = [_store(tmp_path / "a.zarr", labels, ids, seed=1), _store(tmp_path / "b.zarr", labels, ids, seed=2)]
    grid = {"scaler": ["passthrough", SCALER], "clf__C": [0.1, 1.0, 10.0], "clf__class_weight": [None, "balanced"]}
    cfg = _cfg(demo_patch_dataset, model=PIPE, search={"enabled": True, "grid": grid, "folds": 3, "n_jobs": 1})
    record = run_search(cfg, stores)
    assert len(record["table"]) == 12 and record["images"] == len(stems) and record["rows"] == 2 * n
    assert {image_of(i) for i in ids} == set(stems)
    labels_seen = {r["label"] for r in record["table"]}
    assert "scaler=passthrough, clf__C=0.1, clf__class_weight=None" in labels_seen
    assert "scaler=StandardScaler, clf__C=10.0, clf__class_weight=balanced" in labels_seen
    means = [r["mean"] for r in record["table"]]
    assert record["best"] == means.index(max(means)) and all(
        0 <= m <= 1 and r["std"] >= 0 for m, r in zip(means, record["table"])
    )
    again = run_search(cfg.model_copy(update={"search": cfg.search.model_copy(update={"n_jobs": 2})}), stores)
    assert [r["mean"] for r in again["table"]] == means  # parallel fits do not change the result
    choice = search_choice(record)
    assert choice["cv_score"] == max(means) and choice["folds"] == 3 and choice["settings"] == 12
    fit_classifier(cfg, stores, tmp_path / "best.skops", choice["setting"])
    est = load_fitted(cfg, tmp_path / "best.skops")
    chosen_c = choice["setting"]["clf__C"]
    assert est.get_params()["clf__C"] == chosen_c


# ====================================================================================== the flow


@pytest.mark.slow
def test_train_flow_with_search(demo_patch_dataset: Path, tmp_path: Path, prefect_harness) -> None:
    from flows.train import train_flow
    from tests.conftest import task_states

    cfg = {
        "datamodule": {"data_path": str(demo_patch_dataset), "batch_size": 32},
        "backbone": {"name": "mobilenet_v2", "weights": "imagenet"},
        "transforms": {"input_height": 96, "input_width": 96},
        "trainer": {"iteration_over_training": 2},
        "search": {"enabled": True, "folds": 3},
        "task": {"report": False},
        "core": {"runs_folder": str(tmp_path / "runs"), "name": "searchdemo"},
        "storage_root": str(tmp_path / "store"),
    }
    state = train_flow(cfg, return_state=True)
    assert state.is_completed()
    run = Path(state.result()["run_dir"])
    meta = json.loads((run / "deployment_model/model.json").read_text())
    grid = TrainFlowConfig.model_validate(cfg).search.grid
    assert set(meta["search"]["setting"]) == set(grid) and meta["search"]["settings"] == 12
    assert meta["search"]["metric"] == "macro_f1" and 0 <= meta["search"]["cv_score"] <= 1
    searches = list((tmp_path / "store" / "searches").glob("*.json"))
    record = json.loads(searches[0].read_text())
    assert len(searches) == 1 and len(record["table"]) == 12
    st = task_states(state)
    assert st["search-classifier"] == "Completed" and st["publish-search"] == "Completed"
    # the search scores the fit's matrix: both random passes and the train grid (default recipe), not val
    from tasks.model.fit import training_rows

    kinds = {p: fstore.store_attrs(p)["kind"] for p in (tmp_path / "store" / "features").glob("*.zarr")}
    train = sorted(str(p) for p, kind in kinds.items() if kind != "val")
    assert sorted(kinds.values()) == ["grid", "train", "train", "val"]
    assert record["rows"] == len(training_rows(train)[1])
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    table = next(a for a in arts if a.key == "searchdemo-search")
    assert table.type == "table" and "chosen:" in (table.description or "")
    # a rerun serves the search and the fit from the cache; another grid searches again and computes no features
    st = task_states(train_flow(cfg, return_state=True))
    assert st["search-classifier"] == "Cached" and st["fit-classifier"] == "Cached"
    cfg["search"] = {"enabled": True, "folds": 3, "grid": {"clf__C": [0.5, 2.0], "scaler": ["passthrough", SCALER]}}
    state = train_flow(cfg, return_state=True)
    st = task_states(state)
    assert st["search-classifier"] == "Completed" and st["train-pass-features"] == "Cached"
    assert st["grid-features"] == "Cached" and st["split-features"] == "Cached"
    meta = json.loads((Path(state.result()["run_dir"]) / "deployment_model/model.json").read_text())
    assert meta["search"]["settings"] == 4 and meta["search"]["setting"]["clf__C"] in (0.5, 2.0)
