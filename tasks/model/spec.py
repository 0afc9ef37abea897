"""Classifier specs: any scikit-learn estimator or ``Pipeline`` written as nested Hydra ``_target_`` specs.

``{_target_: sklearn.pipeline.Pipeline, steps: [[scaler, {_target_: sklearn.preprocessing.StandardScaler}],
[clf, {_target_: sklearn.linear_model.LogisticRegression, max_iter: 10000}]]}`` is built with
``hydra.utils.instantiate`` (the syntax Quadra's configs use); ``model.classifier`` + ``model.params`` is the
shorthand ``{_target_: classifier, **params}``. :func:`build_estimator` builds one (with a search setting
applied and ``random_state`` seeded), :func:`estimator_problem` says why it cannot serve as a classifier,
:func:`type_names` lists the classes it holds (trusted when its fitted file is loaded back) and
:func:`user_module_digests` the source digests of the user's own modules it uses (they enter the fit key).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

SCALER = {"_target_": "sklearn.preprocessing.StandardScaler"}

#: patchflow's default classifier: standardised features, class-balanced logistic regression
DEFAULT_PIPELINE: dict[str, Any] = {
    "_target_": "sklearn.pipeline.Pipeline",
    "steps": [
        ["scaler", SCALER],
        [
            "clf",
            {
                "_target_": "sklearn.linear_model.LogisticRegression",
                "max_iter": 10000,
                "class_weight": "balanced",
            },
        ],
    ],
}

#: packages whose code never enters a fit key (installed libraries are excluded by their location too)
_LIBRARIES = ("sklearn", "numpy", "scipy", "skops", "hydra", "omegaconf", "joblib", "threadpoolctl")


def shorthand_spec(classifier: str, params: dict[str, Any]) -> dict[str, Any]:
    """``model.classifier`` (``package.module.Name`` or ``package.module:Name``) + ``model.params`` as a spec."""
    return {"_target_": classifier.replace(":", "."), **params}


def describe(spec: dict[str, Any]) -> str:
    """A spec in one short line: its ``_target_`` and the ``_target_`` of its parts, e.g.
    ``sklearn.pipeline.Pipeline(StandardScaler, LogisticRegression)``."""
    inner = [t.rpartition(".")[2] for t in list(_targets(spec))[1:]]
    top = str(spec.get("_target_"))
    return f"{top}({', '.join(inner)})" if inner else top


def _targets(node: Any) -> Iterator[str]:
    """Every ``_target_`` string of a nested spec, outermost first."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for k, v in node.items():
            if k != "_target_":
                yield from _targets(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _targets(v)


def instantiate_value(value: Any) -> Any:
    """A spec (a mapping with ``_target_``) built with Hydra; any other value as it is (lists of specs too)."""
    if isinstance(value, dict) and "_target_" in value:
        from hydra.utils import instantiate

        return _tuples(instantiate(value, _convert_="all"))
    if isinstance(value, list) and any(isinstance(v, dict) and "_target_" in v for v in value):
        return [instantiate_value(v) for v in value]
    return value


def build_estimator(spec: dict[str, Any], seed: int, setting: dict[str, Any] | None = None) -> Any:
    """A new estimator from ``spec`` with the search ``setting`` (``{param path: spec value}``) applied and every
    unset (``None``) ``random_state`` of the estimator and its parts given ``seed``.

    Raises ``ValueError`` (one line, naming the spec) when Hydra cannot build it or a setting does not apply.
    """
    try:
        est = instantiate_value(dict(spec))
    except Exception as exc:
        raise ValueError(f"cannot build {describe(spec)}: {_first_line(exc)}") from None
    if setting:
        try:
            est.set_params(**{k: instantiate_value(v) for k, v in setting.items()})
        except Exception as exc:
            raise ValueError(f"cannot apply {setting} to {describe(spec)}: {_first_line(exc)}") from None
    return seed_unset(est, seed)


def seed_unset(est: Any, seed: int) -> Any:
    """``est`` with every ``random_state`` that is unset (``None``), its parts' included, set to ``seed``."""
    if hasattr(est, "get_params") and not isinstance(est, type):
        unset = {
            k: seed
            for k, v in est.get_params(deep=True).items()
            if (k == "random_state" or k.endswith("__random_state")) and v is None
        }
        if unset:
            est.set_params(**unset)
    return est


def _first_line(exc: BaseException) -> str:
    """The last line of an error (Hydra's hint about HYDRA_FULL_ERROR left out), cut short."""
    lines = str(exc).strip().splitlines()
    text = (lines[-1] if lines else "").replace(", set env var HYDRA_FULL_ERROR=1 to see chained exception.", "")
    return f"{type(exc).__name__}: {text[:300]}"


def _tuples(est: Any) -> Any:
    """Hydra builds ``steps: [[name, est], ...]`` as lists; scikit-learn documents them as tuples."""
    if not hasattr(est, "get_params") or isinstance(est, type):
        return est
    for name, value in est.get_params(deep=False).items():
        if isinstance(value, list) and value and all(_is_named(v) for v in value):
            est.set_params(**{name: [tuple(v) for v in value]})
    for child in children(est):
        _tuples(child)
    return est


def _is_named(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[0], str)


def children(est: Any) -> Iterator[Any]:
    """The estimators an estimator holds directly (pipeline steps, ensemble members, a wrapped estimator)."""
    for value in est.get_params(deep=False).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            parts = item if isinstance(item, (list, tuple)) else [item]
            for part in parts:
                if hasattr(part, "get_params") and not isinstance(part, type):
                    yield part


def estimator_problem(est: Any) -> str | None:
    """Why ``est`` cannot be patchflow's classifier, as the end of a sentence naming it (``has no predict_proba
    ...``, ``: its last step LinearSVC has no predict_proba ...``), or ``None``."""
    if not hasattr(est, "fit"):
        return "has no fit method"
    if hasattr(est, "predict_proba"):
        return None
    last = est.steps[-1][1] if hasattr(est, "steps") and est.steps else est
    hint = " (SVC and NuSVC need probability: true)" if type(last).__name__ in ("SVC", "NuSVC") else ""
    where = f": its last step {type(last).__name__}" if last is not est else ""
    return f"{where} has no predict_proba{hint}; patchflow needs class probabilities".lstrip()


def walk(est: Any) -> Iterator[Any]:
    """``est`` and every estimator inside it, depth first."""
    yield est
    if hasattr(est, "get_params") and not isinstance(est, type):
        for child in children(est):
            yield from walk(child)


def type_names(est: Any) -> set[str]:
    """``module.QualName`` of every estimator class in ``est`` (as skops names untrusted types)."""
    return {f"{type(e).__module__}.{type(e).__qualname__}" for e in walk(est)}


@lru_cache(maxsize=1)
def _installed_roots() -> tuple[Path, ...]:
    """Folders of the standard library and installed packages: code there is not the user's own."""
    import site
    import sysconfig

    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return tuple(Path(p).resolve() for p in paths if p)


def _user_file(module_name: str) -> Path | None:
    """The source file of ``module_name`` when it is the user's own code (not a library, not installed)."""
    if module_name.partition(".")[0] in _LIBRARIES:
        return None
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    path = Path(file).resolve()
    if any(path.is_relative_to(root) for root in _installed_roots()):
        return None
    return path


def user_module_digests(est: Any, spec: dict[str, Any]) -> dict[str, str]:
    """``{module: sha256 of its source}`` for the user's own modules that ``est`` (its classes) and ``spec`` (its
    ``_target_`` callables) come from; editing one changes the fit key, so the classifier is refitted."""
    modules = {type(e).__module__ for e in walk(est)}
    modules |= {t.rpartition(".")[0] for t in _targets(spec)}
    out = {}
    for name in sorted(modules):
        path = _user_file(name)
        if path is not None:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
