"""Bundles, classifiers and cached outputs: tampering and trust (issue 12; docs/bad-inputs.md section K, cases 90-104).

No loaded file runs code: classifiers are skops files (only skops's trusted types load), a pickle
(``classifier.joblib``) loads only with the trust flag, and Prefect's cache records are read only when
they are plain JSON. Every file of a bundle is checked against its manifest before anything is loaded,
and every stage's cached output that was edited or deleted is recomputed, never served.

Test names are ``test_<NN>_<what>``; ``NN`` is the entry number in docs/bad-inputs.md.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from storage import bundle as bdl
from storage import features as fstore
from storage.manifest import MANIFEST_FILE, write_manifest
from tests._synth import tree_digest

REPO = Path(__file__).resolve().parents[1]
FILES = (
    "model.json",
    "classifier.skops",
    "model.pt",
    "model.onnx",
    "model.pth",
    "model_config.yaml",
    "classifier.joblib",
)


# ------------------------------------------------------------------------------------------ helpers


def expect(exc_type: type[BaseException], fn, *names: object, fix: str) -> str:
    """``fn`` raises ``exc_type`` whose one-line message names every ``names`` item and contains ``fix``."""
    with pytest.raises(exc_type) as ei:
        fn()
    msg = str(ei.value)
    for name in names:
        assert str(name) in msg, f"{name!r} not named in: {msg}"
    assert fix in msg, f"no fix ({fix!r}) in: {msg}"
    assert "\n" not in msg, msg
    if os.environ.get("PATCHFLOW_SHOW_ERRORS"):
        print(f"\n[{type(ei.value).__name__}] {msg}")
    return msg


def _store(path: Path, labels: np.ndarray, dim: int, seed: int) -> str:
    """A complete feature store with separable random features (label + noise)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    x = rng.normal(size=(n, dim)).astype(np.float32) + labels[:, None].astype(np.float32)
    fstore.create_store(path, n, dim, {"kind": "train"})
    fstore.write_feature_rows(path, 0, x)
    fstore.write_row_meta(path, labels.astype(np.int16), [f"s{i}.png" for i in range(n)], np.full((n, 4), -1))
    fstore.mark_complete(path, fstore.store_digest(path))
    return str(path)


def _cfg(data: Path, backbone: str = "mobilenet_v2", **sections):
    from tasks.model.config import TrainFlowConfig

    cfg = {
        "datamodule": {"data_path": str(data)},
        "backbone": {"name": backbone, "weights": None, "feature_layers": "final"},  # widths 1280 / 512
        "transforms": {"input_height": 32, "input_width": 32},
        "task": {"runtime": "torch", "report": False},
        "export": {"types": ["torchscript", "onnx", "pytorch"], "joblib_classifier": True},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return TrainFlowConfig.model_validate(cfg)


def _export(cfg, out: Path, dim: int, seed: int) -> Path:
    """Fit a classifier on random features of width ``dim`` and export a full bundle (no Prefect)."""
    import torch

    from tasks.features.params import class_map
    from tasks.model.bundle import export_bundle
    from tasks.model.fit import fit_classifier

    classes = sorted(class_map(cfg).values())
    labels = np.array([classes[i % len(classes)] for i in range(48)])
    store = _store(out.parent / f"feats-{seed}.zarr", labels, dim, seed)
    fit_classifier(cfg, [store], out.parent / f"clf-{seed}.skops")
    torch.manual_seed(seed)  # random-init backbone: each seed is another model
    return export_bundle(cfg, out.parent / f"clf-{seed}.skops", out)


@pytest.fixture(scope="module")
def bundles(demo_patch_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``a``: MobileNetV2 bundle with every file (three exports, classifier.skops + classifier.joblib);
    ``b``: a ResNet-18 bundle (every file differs); ``c``: another MobileNetV2 model (same feature size as ``a``)."""
    root = tmp_path_factory.mktemp("bundles")
    out = {
        "a": _export(_cfg(demo_patch_dataset), root / "a" / "deployment_model", 1280, 0),
        "b": _export(
            _cfg(demo_patch_dataset, "resnet18", transforms={"mean": [0.5, 0.5, 0.5]}),
            root / "b" / "deployment_model",
            512,
            1,
        ),
        "c": _export(
            _cfg(demo_patch_dataset, export={"types": ["torchscript"], "joblib_classifier": False}),
            root / "c" / "deployment_model",
            1280,
            2,
        ),
    }
    return out


@pytest.fixture()
def bundle(bundles: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of bundle ``a``."""
    dst = tmp_path / "deployment_model"
    shutil.copytree(bundles["a"], dst)
    return dst


@pytest.fixture(scope="module")
def images(demo_patch_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64x64 images (one grid cell each)."""
    folder = tmp_path_factory.mktemp("images") / "raw"
    folder.mkdir()
    for i, p in enumerate(sorted(demo_patch_dataset.glob("val/*/*.png"))[:2]):
        shutil.copy2(p, folder / f"img{i}.png")
    return folder


def _predict(b: Path, images: Path, out: Path, trust: bool = False) -> dict:
    from tasks.predict.stage import predict_images

    return predict_images(b, images, out, batch_size=8, trust_pickle=trust)


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _crafted_pickle(marker: Path) -> bytes:
    """A pickle whose loading writes ``marker`` (what an attacker's payload would do, harmlessly)."""

    class Payload:
        def __reduce__(self):
            return exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('code ran')",)

    return pickle.dumps(Payload())


def _reseal(b: Path) -> None:
    """Rewrite a bundle's manifest over its current files (what a forger, or another exporter, would do)."""
    (b / MANIFEST_FILE).unlink(missing_ok=True)
    write_manifest(b)


# ============================================================================= classifier format


def test_90_skops_round_trips_the_usual_classifiers(tmp_path: Path, demo_patch_dataset: Path) -> None:
    """LogisticRegression, a scaler pipeline, SVC(probability=True) and a random forest survive skops with the
    same probabilities. The forest holds ``sklearn.tree._tree.Tree`` (off skops's default list: crafted node
    indices can crash predict): the train flow accepts it, a bundle needs the trust flag."""
    import warnings

    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from storage.classifier import load_classifier_file, untrusted_types, write_skops
    from tasks.model.fit import fit_classifier, load_fitted

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 16)), np.arange(60) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # SVC(probability=True) is deprecated in scikit-learn 1.9
        models = {
            "lr": LogisticRegression(max_iter=500),
            "pipe": Pipeline([("s", StandardScaler()), ("c", LogisticRegression())]),
            "svc": SVC(probability=True, random_state=0),
            "rf": RandomForestClassifier(n_estimators=5, random_state=0),
        }
        for name, est in models.items():
            est.fit(x, y)
            path = write_skops(est, tmp_path / f"{name}.skops")
            trusted = ["sklearn.tree._tree.Tree"] if name == "rf" else []
            assert untrusted_types(path=path) == trusted, name
            back = load_classifier_file(path, trusted, fix="")
            np.testing.assert_array_equal(back.predict_proba(x), est.predict_proba(x))
    # the fit stage stores the forest as skops and loads it back without any flag
    cfg = _cfg(
        demo_patch_dataset,
        model={"classifier": "sklearn.ensemble.RandomForestClassifier", "params": {"n_estimators": 4}},
    )
    store = _store(tmp_path / "f.zarr", np.arange(40) % 3, 16, 0)
    fit_classifier(cfg, [store], tmp_path / "rf-fit.skops")
    assert load_fitted(cfg, tmp_path / "rf-fit.skops").n_features_in_ == 16
    # in a bundle the Tree type is refused without the trust flag
    b = tmp_path / "rf-bundle"
    b.mkdir()
    shutil.copy2(tmp_path / "rf.skops", b / "classifier.skops")
    (b / "model.json").write_text(json.dumps({"classes": {"0": "a", "1": "b", "2": "c"}}))
    write_manifest(b)
    expect(
        bdl.BundleError,
        lambda: bdl.load_classifier(b, {"classes": {"0": "a", "1": "b", "2": "c"}}),
        "classifier.skops",
        "['sklearn.tree._tree.Tree']",
        fix="--trust-pickle",
    )
    assert bdl.load_classifier(b, {"classes": {"0": "a", "1": "b", "2": "c"}}, trust_pickle=True).n_estimators == 5


_USER_CLASSIFIER = textwrap.dedent(
    """
    from sklearn.linear_model import LogisticRegression


    class MyClassifier(LogisticRegression):
        '''A classifier class from the user's own module.'''


    class Helper:
        def __init__(self):
            self.note = "extra state"


    class WithHelper(LogisticRegression):
        def fit(self, X, y):
            self.helper_ = Helper()
            return super().fit(X, y)
    """
)


def test_91_user_classifier_class_needs_trust(tmp_path: Path, demo_patch_dataset: Path, monkeypatch) -> None:
    """A class from a user module is not on skops's list: the train flow trusts the configured class (the config
    imports it anyway); any other type needs model.trusted_types; a bundle needs the trust flag."""
    from tasks.config import ConfigError
    from tasks.model.fit import fit_classifier, load_fitted

    (tmp_path / "userclf_91.py").write_text(_USER_CLASSIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    store = _store(tmp_path / "f.zarr", np.arange(40) % 2, 8, 0)
    cfg = _cfg(demo_patch_dataset, model={"classifier": "userclf_91.MyClassifier", "params": {}})
    fit_classifier(cfg, [store], tmp_path / "mine.skops")
    assert type(load_fitted(cfg, tmp_path / "mine.skops")).__name__ == "MyClassifier"

    cfg2 = _cfg(demo_patch_dataset, model={"classifier": "userclf_91.WithHelper", "params": {}})
    expect(
        ConfigError,
        lambda: fit_classifier(cfg2, [store], tmp_path / "helper.skops"),
        "userclf_91.WithHelper",
        "['userclf_91.Helper']",
        fix="model.trusted_types",
    )
    assert not (tmp_path / "helper.skops").exists()
    cfg3 = _cfg(
        demo_patch_dataset,
        model={"classifier": "userclf_91.WithHelper", "params": {}, "trusted_types": ["userclf_91.Helper"]},
    )
    fit_classifier(cfg3, [store], tmp_path / "helper.skops")
    assert load_fitted(cfg3, tmp_path / "helper.skops").helper_.note == "extra state"

    b = tmp_path / "bundle"
    b.mkdir()
    shutil.copy2(tmp_path / "mine.skops", b / "classifier.skops")
    meta = {"classes": {"0": "a", "1": "b"}}
    (b / "model.json").write_text(json.dumps(meta))
    write_manifest(b)
    msg = expect(
        bdl.BundleError,
        lambda: bdl.load_classifier(b, meta),
        b,
        "classifier.skops",
        "['userclf_91.MyClassifier']",
        fix="task.trust_pickle: true (evaluate) or pass --trust-pickle (predict)",
    )
    assert "can run" in msg
    assert type(bdl.load_classifier(b, meta, trust_pickle=True)).__name__ == "MyClassifier"


# ===================================================================================== pickles


@pytest.mark.slow
def test_92_crafted_pickle_never_runs_without_the_flag(
    bundle: Path, images: Path, tmp_path: Path, demo_patch_dataset: Path
) -> None:
    """classifier.joblib replaced by a crafted pickle: refused by the manifest; with a forged manifest and no
    classifier.skops, refused by the loader; a Quadra-style bundle (no manifest) is refused without the flag.
    The payload never runs, unless the trust flag is given (documented: then it does)."""
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.evaluation.stage import extract_with_bundle

    marker = tmp_path / "PWNED"
    (bundle / "classifier.joblib").write_bytes(_crafted_pickle(marker))
    out = tmp_path / "pred"
    expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, out),
        bundle,
        "classifier.joblib was modified after export",
        fix="re-export the model",
    )
    (bundle / "classifier.skops").unlink()
    _reseal(bundle)  # a forger rewrites the manifest too
    expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, out),
        "classifier.joblib is a pickle (joblib)",
        fix="--trust-pickle",
    )
    cfg = EvaluateFlowConfig.model_validate(
        {"datamodule": {"data_path": str(demo_patch_dataset), "split": "val"}, "task": {"model_path": str(bundle)}}
    )
    expect(
        bdl.BundleError,
        lambda: extract_with_bundle(cfg, bdl.open_bundle(bundle), tmp_path / "store"),
        "classifier.joblib is a pickle (joblib)",
        fix="--trust-pickle",
    )
    assert not (tmp_path / "store").exists()
    (bundle / MANIFEST_FILE).unlink()  # Quadra-style: no manifest
    expect(bdl.BundleError, lambda: _predict(bundle, images, out), "has no _manifest.json", fix="--trust-pickle")
    assert not marker.exists(), "the crafted pickle ran without the trust flag"
    assert not out.exists()
    # with the flag the pickle is loaded, and its code runs: that is what the flag documents
    expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, out, trust=True),
        "not a fitted classifier",
        fix="predict_proba",
    )
    assert marker.read_text() == "code ran"


@pytest.mark.slow
def test_92_crafted_pickle_cli_exits_1_with_one_line(bundle: Path, images: Path, tmp_path: Path) -> None:
    """The issue's case through the real CLI: rc 0 before, now exit 1, one ``error:`` line, no payload run."""
    marker = tmp_path / "PWNED"
    (bundle / "classifier.joblib").write_bytes(_crafted_pickle(marker))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.predict",
            "--model",
            str(bundle),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "pred"),
            "--storage-root",
            str(tmp_path / "store"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]  # the run log above it keeps Prefect's traceback (as #65b)
    assert errors[0].startswith(f"error: bundle {bundle}: classifier.joblib was modified after export (")
    assert errors[0].endswith("bytes); re-export the model (or restore the file)"), errors
    assert not marker.exists() and not (tmp_path / "pred").exists()


@pytest.mark.slow
def test_93_bundle_without_manifest_needs_the_trust_flag(
    bundles: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    """A hand-made or Quadra bundle (model.json + classifier.joblib + an export, no manifest) is refused without the
    flag and predicts with it; when both classifier files exist, classifier.skops is the one used."""
    quadra = tmp_path / "quadra"
    quadra.mkdir()
    for name in ("model.json", "model.pt", "classifier.joblib"):
        shutil.copy2(bundles["a"] / name, quadra / name)
    before = tree_digest(quadra)
    out = tmp_path / "pred"
    msg = expect(
        bdl.BundleError,
        lambda: _predict(quadra, images, out),
        quadra,
        "has no _manifest.json",
        fix="set task.trust_pickle: true (evaluate) or pass --trust-pickle (predict)",
    )
    assert "re-export the model" in msg and not out.exists()
    res = _predict(quadra, images, out, trust=True)
    assert len(res["images"]) == 2 and (out / "img0_classmap.png").is_file()
    assert tree_digest(quadra) == before  # nothing written into the bundle
    # both files present: the skops one is loaded (a broken joblib next to it is never read)
    both = tmp_path / "both"
    shutil.copytree(bundles["a"], both)
    (both / "classifier.joblib").write_bytes(b"not a pickle")
    _reseal(both)
    opened = bdl.open_bundle(both)
    root, meta = opened.root, opened.meta
    assert bdl.classifier_file(root).name == "classifier.skops"
    assert hasattr(bdl.load_classifier(root, meta), "predict_proba")


# ======================================================================= tampered bundle files


def _tamper(b: Path, name: str, how: str, other: Path) -> None:
    path = b / name
    if how == "edited":
        _flip_middle(path)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "swapped":
        src = other / name if (other / name).is_file() else None
        assert src is not None and src.read_bytes() != path.read_bytes(), f"{name} is the same in the other bundle"
        shutil.copy2(src, path)
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["edited", "truncated", "swapped", "deleted"])
@pytest.mark.parametrize("name", FILES)
def test_94_every_bundle_file_tampered_is_refused(
    bundle: Path, bundles: dict[str, Path], images: Path, tmp_path: Path, name: str, how: str
) -> None:
    _tamper(bundle, name, how, bundles["b"])
    what = "was deleted after export" if how == "deleted" else "was modified after export"
    out = tmp_path / "pred"
    msg = expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, out),
        f"bundle {bundle}: {name} {what}",
        fix="re-export the model (or restore the file)",
    )
    if how == "truncated":
        assert "bytes" in msg  # the sizes say it was cut
    assert not out.exists()  # refused before anything was loaded or written


def test_95_added_file_is_refused_promotion_record_is_not(bundle: Path, images: Path, tmp_path: Path) -> None:
    (bundle / "model.pt.bak").write_bytes(b"x")
    expect(
        bdl.BundleError,
        lambda: bdl.open_bundle(bundle),
        f"bundle {bundle}: model.pt.bak was added after export",
        fix="remove it or re-export the model",
    )
    (bundle / "model.pt.bak").unlink()
    (bundle / "version.json").write_text('{"version": "v0001"}')  # what tasks/promotion.py adds to a version folder
    assert bdl.open_bundle(bundle).root == bundle


def test_bundle_opened_once_then_reopened_by_its_digest(bundle: Path) -> None:
    """open_bundle takes the file digests from the manifest it verified (the cache keys' digest, no second read);
    reopen_bundle (in a task) checks the manifest's fast path and refuses a bundle whose content changed."""
    from storage.fingerprint import combine, file_digest

    opened = bdl.open_bundle(bundle)
    names = [n for n in bdl.BUNDLE_FILES if (bundle / n).is_file()]
    assert opened.digest == combine(*(f"{n}:{file_digest(bundle / n)}" for n in names))
    assert bdl.reopen_bundle(bundle / "model.json", opened.digest).meta == opened.meta
    expect(bdl.BundleError, lambda: bdl.reopen_bundle(bundle, "0" * 64), f"bundle {bundle} changed", fix="rerun")
    (bundle / "model.json").write_text((bundle / "model.json").read_text().replace('"std"', '"std" '))
    expect(
        bdl.BundleError,
        lambda: bdl.reopen_bundle(bundle, opened.digest),
        "model.json was modified after export",
        fix="re-export the model",
    )


def test_96_model_json_swapped_classes_or_other_mean_is_refused(bundle: Path, images: Path, tmp_path: Path) -> None:
    """Before: rc 0 and silently different predictions. Now refused, naming model.json."""
    original = (bundle / "model.json").read_text()
    for change in ("classes", "mean"):
        meta = json.loads(original)
        if change == "classes":
            names = list(meta["classes"].values())
            meta["classes"] = dict(zip(meta["classes"], names[1:] + names[:1]))
        else:
            meta["mean"] = [0.5, 0.5, 0.5]
        (bundle / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        expect(
            bdl.BundleError,
            lambda: _predict(bundle, images, tmp_path / "pred"),
            f"bundle {bundle}: model.json was modified after export",
            fix="re-export the model",
        )
    assert not (tmp_path / "pred").exists()


def test_97_classifier_from_another_model_with_the_same_feature_size(
    bundle: Path, bundles: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    """Before: rc 0 with another model's classifier. The manifest refuses it; without a manifest (trusted) a
    classifier whose classes are not model.json's is refused too."""
    shutil.copy2(bundles["c"] / "classifier.skops", bundle / "classifier.skops")
    expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, tmp_path / "pred"),
        f"bundle {bundle}: classifier.skops was modified after export",
        fix="re-export the model",
    )
    meta = json.loads((bundle / "model.json").read_text())
    meta["classes"] = {k: v for k, v in meta["classes"].items() if k != max(meta["classes"])}
    (bundle / "model.json").write_text(json.dumps(meta))
    (bundle / MANIFEST_FILE).unlink()
    expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, tmp_path / "pred", trust=True),
        "the classifier predicts classes",
        fix="re-export the model",
    )
    assert not (tmp_path / "pred").exists()


@pytest.mark.slow
def test_98_classifier_feature_size_mismatch(
    bundle: Path, bundles: dict[str, Path], images: Path, tmp_path: Path, demo_patch_dataset: Path
) -> None:
    """A classifier fitted on 512-wide features in a bundle whose backbone gives 1280 (manifest consistent, as a
    mis-assembled export would be): one line, checked before any image or patch is read."""
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.evaluation.stage import extract_with_bundle

    shutil.copy2(bundles["b"] / "classifier.skops", bundle / "classifier.skops")
    (bundle / "classifier.joblib").unlink()
    meta = json.loads((bundle / "model.json").read_text())
    meta["classes"] = json.loads((bundles["b"] / "model.json").read_text())["classes"]
    (bundle / "model.json").write_text(json.dumps(meta))
    _reseal(bundle)
    out = tmp_path / "pred"
    expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, out),
        "bundle classifier expects 512 features, backbone gives 1280",
        fix="re-export the model",
    )
    assert not out.exists()
    cfg = EvaluateFlowConfig.model_validate(
        {"datamodule": {"data_path": str(demo_patch_dataset), "split": "val"}, "task": {"model_path": str(bundle)}}
    )
    store = tmp_path / "store"
    expect(
        bdl.BundleError,
        lambda: extract_with_bundle(cfg, bdl.open_bundle(bundle), store),
        "bundle classifier expects 512 features, backbone gives 1280",
        fix="re-export the model",
    )
    assert not store.exists()


def test_99_truncated_classifier_in_a_trusted_bundle_without_manifest(
    bundle: Path, images: Path, tmp_path: Path
) -> None:
    """The manifest catches a truncated classifier (#94); without a manifest the loader says so itself."""
    (bundle / MANIFEST_FILE).unlink()
    data = (bundle / "classifier.skops").read_bytes()
    (bundle / "classifier.skops").write_bytes(data[: len(data) // 2])
    expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, tmp_path / "pred", trust=True),
        f"bundle {bundle}: classifier.skops is damaged or truncated",
        fix="BadZipFile",
    )
    (bundle / "classifier.skops").unlink()
    data = (bundle / "classifier.joblib").read_bytes()
    (bundle / "classifier.joblib").write_bytes(data[: len(data) // 2])
    expect(
        bdl.BundleError,
        lambda: _predict(bundle, images, tmp_path / "pred", trust=True),
        f"bundle {bundle}: classifier.joblib is damaged or truncated",
        fix="Error",
    )
    assert not (tmp_path / "pred").exists()


# ================================================================================== full disk


_FULL_DISK_EXPORT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from tasks.model.bundle import export_backbone
    from tasks.model.config import TrainFlowConfig
    args = json.loads(sys.argv[1])
    cfgs = {t: TrainFlowConfig.model_validate({**args["cfg"], "export": {"types": [t]}})
            for t in ("torchscript", "onnx", "pytorch")}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the exports are ~9 MB
    res = {}
    for t, cfg in cfgs.items():
        try:
            export_backbone(cfg, Path(args["out"]) / t)
            res[t] = {"oserror": False, "msg": "no error"}
        except Exception as exc:
            res[t] = {"oserror": isinstance(exc, OSError), "msg": str(exc), "errno": getattr(exc, "errno", None)}
    print(json.dumps(res))
    """
)


@pytest.mark.slow
def test_100_full_disk_during_backbone_export(tmp_path: Path, demo_patch_dataset: Path) -> None:
    """A real full disk (a file size limit in a subprocess): each export names its file and says disk full."""
    cfg = {
        "datamodule": {"data_path": str(demo_patch_dataset)},
        "backbone": {"name": "mobilenet_v2", "weights": None},
        "transforms": {"input_height": 32, "input_width": 32},
        "task": {"runtime": "torch"},
    }
    out = tmp_path / "backbones"
    arg = json.dumps({"cfg": cfg, "out": str(out)})
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_EXPORT, arg],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for t, name in {"torchscript": "model.pt", "onnx": "model.onnx", "pytorch": "model.pth"}.items():
        r = res[t]
        assert r["oserror"] and r["errno"] == 27, (t, r)  # EFBIG, as on a full disk
        fix = "free disk space or set storage_root to another disk"
        assert f"/{name}: disk full (File too large); {fix}" in r["msg"], r
        assert r["msg"].startswith("could not write ") and "\n" not in r["msg"]
    assert not out.exists() or not any(out.iterdir())  # nothing published, no partial folder left


# ======================================================================= cached outputs (flows)


@pytest.mark.slow
def test_101_planted_cache_record_is_never_decoded(tmp_path: Path, prefect_harness, monkeypatch) -> None:
    """A cache record is read only when it is plain JSON: a planted pickle record (whatever serializer the task
    sets, Prefect decodes a record with the one named inside it) and a JSON record whose ``__class__`` names a
    module (Prefect's JSON decoder imports it) are ignored; the stage is recomputed and its record rewritten."""
    from prefect import flow, task

    from storage.fingerprint import combine
    from tasks.stage import cached_stage

    calls = []

    @task(name="bundle-security-probe", persist_result=True)
    def probe(key: str) -> dict:
        calls.append(key)
        return {"value": 1}

    @flow(name="bundle-security-probe-flow")
    def run() -> dict:
        return cached_stage(probe, tmp_path, False, True)("k1")

    assert run() == {"value": 1} and len(calls) == 1
    assert run() == {"value": 1} and len(calls) == 1  # a plain JSON record: served
    record = tmp_path / "prefect-results" / combine("bundle-security-probe", "k1")
    good = json.loads(record.read_text())
    assert good["metadata"]["serializer"]["type"] == "json" and good["metadata"]["serializer"]["object_decoder"] is None

    marker = tmp_path / "PWNED"
    planted = dict(good, metadata={**good["metadata"], "serializer": {"type": "pickle", "picklelib": "pickle"}})
    import base64

    planted["result"] = base64.encodebytes(_crafted_pickle(marker)).decode()
    record.write_text(json.dumps(planted))
    assert run() == {"value": 1} and len(calls) == 2  # recomputed, never unpickled
    assert not marker.exists()

    (tmp_path / "mods").mkdir()
    payload = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('imported')\n"
    (tmp_path / "mods" / "evil_mod_101.py").write_text(payload)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    json_rec = dict(
        good,
        metadata={
            **good["metadata"],
            "serializer": {
                **good["metadata"]["serializer"],
                "object_decoder": "prefect.serializers.prefect_json_object_decoder",
            },
        },
    )
    json_rec["result"] = json.dumps({"__class__": "evil_mod_101.X", "data": {}})
    record.write_text(json.dumps(json_rec))
    assert run() == {"value": 1} and len(calls) == 3
    assert not marker.exists() and "evil_mod_101" not in sys.modules
    assert json.loads(record.read_text())["metadata"]["serializer"]["object_decoder"] is None  # rewritten plain


def _runs_by_name(state) -> dict[str, list[str]]:
    from tests.conftest import task_runs

    out: dict[str, list[str]] = {}
    for r in task_runs(state):
        out.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    return out


@pytest.fixture(scope="module")
def flows_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A demo dataset built and trained by the flows once (3 feature passes, tiny inputs)."""
    from flows.dataset import dataset_flow
    from flows.train import train_flow
    from tasks.demo_data import make_demo_dataset

    tmp = tmp_path_factory.mktemp("flows")
    d = make_demo_dataset(tmp / "raw", n_images=10, size=(128, 160), seed=4)
    ds_cfg = {
        "data": {
            "images": d["images"],
            "masks": d["masks"],
            "mask_extension": "_mask",
            "class_to_idx_file": str(tmp / "raw" / "class_to_idx.json"),
        },
        "dataset": {"output_folder": str(tmp / "patches"), "patch_size": [64, 64], "val_size": 0.3, "test_size": 0.3},
        "storage_root": str(tmp / "store"),
    }
    ds_state = dataset_flow(ds_cfg, return_state=True)
    train_cfg = {
        "datamodule": {"data_path": str(tmp / "patches")},
        "backbone": {"name": "mobilenet_v2", "weights": "imagenet"},
        "transforms": {"input_height": 32, "input_width": 32},
        "trainer": {"iteration_over_training": 3},
        "task": {"runtime": "torch", "report": False},
        "export": {"types": ["torchscript", "pytorch"]},
        "core": {"runs_folder": str(tmp / "runs")},
        "storage_root": str(tmp / "store"),
    }
    ref = train_flow(train_cfg)
    return {"tmp": tmp, "ds_cfg": ds_cfg, "ds_state": ds_state, "train_cfg": train_cfg, "ref": ref, "raw": d}


@pytest.mark.slow
def test_102_train_stage_outputs_tampered_are_recomputed(flows_run: dict, prefect_harness, monkeypatch) -> None:
    """Edited or deleted: a val feature chunk, the fitted classifier, the backbone export, the bundle's model.json
    and a validation file; one pass's cache record replaced by a pickle. The next run recomputes exactly those
    stages (and that pass), serves the rest, and ends with the same bundle and metrics."""
    from flows.train import train_flow
    from storage.fingerprint import file_digest

    store, ref = flows_run["tmp"] / "store", flows_run["ref"]
    kinds = {p: fstore.store_attrs(p)["kind"] for p in sorted((store / "features").glob("*.zarr"))}
    val = next(p for p, k in kinds.items() if k == "val")
    chunk = next(p for p in sorted((val / "features" / "c").rglob("*")) if p.is_file())
    _flip_middle(chunk)
    model = next((store / "models").glob("*.skops"))
    _flip_middle(model)
    backbone = next(p for p in (store / "backbones").iterdir() if p.is_dir())
    (backbone / "model.pt").unlink()
    bundle = next((store / "bundles").glob("*/deployment_model"))
    meta = json.loads((bundle / "model.json").read_text())
    meta["mean"] = [0.5, 0.5, 0.5]
    (bundle / "model.json").write_text(json.dumps(meta))
    validation = next(p for p in (store / "validation").iterdir() if p.is_dir())
    (validation / "metrics.json").unlink()
    # one train pass's cache record replaced by a pickle that would write a marker
    marker = flows_run["tmp"] / "PWNED-102"
    records = [
        p
        for p in (store / "prefect-results").iterdir()
        if p.is_file()
        and "/features/" in json.loads(p.read_text())["result"]
        and kinds.get(Path(json.loads(json.loads(p.read_text())["result"]))) == "train"
    ]
    assert len(records) == 3
    import base64

    rec = json.loads(records[0].read_text())
    rec["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle"}
    rec["result"] = base64.encodebytes(_crafted_pickle(marker)).decode()
    records[0].write_text(json.dumps(rec))

    state = train_flow(flows_run["train_cfg"], return_state=True)
    assert state.is_completed()
    runs = _runs_by_name(state)
    assert sorted(runs["train-pass-features"]) == ["Cached", "Cached", "Completed"]  # the planted record's pass only
    for stage in ("split-features", "fit-classifier", "export-backbone", "export-bundle", "validate-patches"):
        assert runs[stage] == ["Completed"], (stage, runs)
    assert not marker.exists()
    res = state.result()
    assert res["metrics"] == ref["metrics"]
    for name in ("classifier.skops", "model.json"):  # a refit writes the same bytes (skops ids renumbered)
        assert file_digest(Path(res["bundle"]) / name) == file_digest(Path(ref["bundle"]) / name), name
    import torch

    from tasks.features.export import load_export

    x = torch.rand(2, 3, 32, 32)  # TorchScript archives differ between exports (name mangling, serialization id)
    with torch.inference_mode():
        for name in ("model.pt", "model.pth"):
            got, want = (load_export(Path(r["bundle"]) / name, "mobilenet_v2")(x) for r in (res, ref))
            torch.testing.assert_close(got, want)
    assert bdl.open_bundle(res["bundle"]).meta["mean"] != [0.5, 0.5, 0.5]


@pytest.mark.slow
def test_103_dataset_and_evaluation_outputs_tampered_are_recomputed(flows_run: dict, prefect_harness) -> None:
    """A patch of the dataset edited, the evaluation's feature store and its output folder edited/deleted: each is
    recomputed on the next run; an evaluate run on a bundle with a crafted pickle fails without running it."""
    from flows.dataset import dataset_flow
    from flows.evaluate import evaluate_flow
    from tests.conftest import task_states

    tmp = flows_run["tmp"]
    patches = tmp / "patches"
    before, raw_before = tree_digest(patches), tree_digest(tmp / "raw")
    _flip_middle(min(patches.glob("train/*.h5")))
    state = dataset_flow(flows_run["ds_cfg"], return_state=True)
    assert task_states(state)["generate-patch-dataset"] == "Completed"
    assert tree_digest(patches) == before and tree_digest(tmp / "raw") == raw_before  # inputs untouched

    bundle = Path(flows_run["ref"]["bundle"])
    cfg = {
        "datamodule": {"data_path": str(patches)},
        "task": {"model_path": str(bundle), "output": {"report": False}},
        "core": {"runs_folder": str(tmp / "runs")},
        "storage_root": str(tmp / "store"),
    }
    first = evaluate_flow(cfg)
    feats = [p for p in (tmp / "store" / "features").glob("*.zarr") if fstore.store_attrs(p)["kind"] == "test"]
    assert len(feats) == 1
    _flip_middle(next(p for p in sorted((feats[0] / "features" / "c").rglob("*")) if p.is_file()))
    evaluation = next(p for p in (tmp / "store" / "evaluations").iterdir() if p.is_dir())
    (evaluation / "test_results.csv").unlink()
    state = evaluate_flow(cfg, return_state=True)
    assert task_states(state) == {
        "bundle-split-features": "Completed",
        "evaluate-split": "Completed",
        "publish-artifacts": "Completed",
    }
    assert state.result()["metrics"] == first["metrics"]

    crafted = tmp / "crafted" / "deployment_model"
    shutil.copytree(bundle, crafted)
    marker = tmp / "PWNED-103"
    (crafted / "classifier.skops").unlink()
    (crafted / "classifier.joblib").write_bytes(_crafted_pickle(marker))
    _reseal(crafted)
    cfg["task"]["model_path"] = str(crafted)
    state = evaluate_flow(cfg, return_state=True)
    assert state.is_failed()
    assert not marker.exists()


# ============================================================================ Quadra compatibility


@pytest.mark.slow
def test_104_joblib_classifier_is_opt_in(bundles: dict[str, Path], images: Path, tmp_path: Path) -> None:
    """export.joblib_classifier writes Quadra's classifier.joblib next to classifier.skops (same model); patchflow
    reads the skops one without any flag. The default export has no pickle."""
    import joblib
    import skops.io

    a, c = bundles["a"], bundles["c"]
    assert (a / "classifier.joblib").is_file() and not (c / "classifier.joblib").exists()
    x = np.random.default_rng(0).normal(size=(5, 1280))
    quadra = joblib.load(a / "classifier.joblib")  # what Quadra's test task does
    np.testing.assert_array_equal(quadra.predict_proba(x), skops.io.load(a / "classifier.skops").predict_proba(x))
    res = _predict(a, images, tmp_path / "pred")
    assert len(res["images"]) == 2
