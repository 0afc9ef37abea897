"""Training recipes: presets merged into a raw train config before it is validated (explicit keys win).

``recipe: patchflow`` (the default) trains on the train split's grid patches as well as the random crops, with
multi-scale features and a ``StandardScaler`` + class-balanced ``LogisticRegression`` pipeline. ``recipe:
quadra`` is the reference's recipe: random crops only, the backbone's final pooled features and a plain
``LogisticRegression(max_iter=10000)``. The model is one unit: a config that writes any ``model`` key
but ``trusted_types`` keeps its own model whole (with the recipe's search grid only when it takes the recipe's
model). Keys the config schema lacks are not filled in. Because the preset is merged into the config, the
filled-in values show in ``config_resolved.yaml``. :func:`check_model` is the check run when a config is read.
"""

from __future__ import annotations

from typing import Any

from tasks.model.spec import DEFAULT_PIPELINE, build_estimator, estimator_problem

#: the search's C values: they bracket the best C of grouped CV on mtd-dev's cached features (0.1 to 1)
C_VALUES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]

#: the search grid of the default pipeline: 6 C values x class weights = 12 settings. The scaler stays on: without
#: it lbfgs needs 2-4x the iterations, and it lost in grouped CV on mtd-dev at every C <= 1
DEFAULT_GRID: dict[str, list[Any]] = {"clf__C": C_VALUES, "clf__class_weight": [None, "balanced"]}

#: the reference's classifier (quadra/configs/model/logistic_regression.yaml; random_state is core.seed)
QUADRA_MODEL: dict[str, Any] = {"classifier": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 10000}}

RECIPES: dict[str, dict[str, Any]] = {
    "patchflow": {
        "model": DEFAULT_PIPELINE,
        "grid": DEFAULT_GRID,
        "sections": {"trainer": {"grid_patches": True}, "backbone": {"feature_layers": "multiscale"}},
    },
    "quadra": {
        "model": QUADRA_MODEL,
        "grid": {"C": C_VALUES, "class_weight": [None, "balanced"]},
        "sections": {"trainer": {"grid_patches": False}, "backbone": {"feature_layers": "final"}},
    },
}


def _section_fields(model_cls: Any, section: str) -> set[str]:
    """Keys the config schema has in ``section`` (a preset key the schema lacks is not filled in)."""
    field = model_cls.model_fields.get(section)
    return set(getattr(field.annotation, "model_fields", {})) if field is not None else set()


def apply_recipe(model_cls: Any, data: Any) -> Any:
    """``data`` (a raw train config) with every setting it leaves unset taken from its recipe's preset."""
    if not isinstance(data, dict):
        return data
    preset = RECIPES.get(data.get("recipe", "patchflow")) if isinstance(data.get("recipe", ""), str) else None
    if preset is None:  # an unknown recipe: the field's validation names it
        return data
    out = dict(data)
    model = out.get("model")
    if model is None or (isinstance(model, dict) and set(model) <= {"trusted_types"}):
        out["model"] = {**preset["model"], **(model or {})}
        search = out.get("search")
        if search is None or (isinstance(search, dict) and "grid" not in search):
            out["search"] = {"grid": preset["grid"], **(search or {})}
    for section, values in preset["sections"].items():
        known = {k: v for k, v in values.items() if k in _section_fields(model_cls, section)}
        user = out.get(section)
        if known and (user is None or isinstance(user, dict)):
            out[section] = {**known, **(user or {})}
    return out


def _paths_of(params: dict[str, Any], name: str) -> list[str]:
    """Every ``set_params`` path of ``params`` that ends in the parameter ``name`` (``C``, ``clf__C``), shortest
    first."""
    return sorted((k for k in params if k.rpartition("__")[2] == name), key=len)


def default_grid_for(params: dict[str, Any]) -> dict[str, list[Any]]:
    """The default search grid (C values x class weights) addressed to wherever the estimator of ``params``
    (``get_params(deep=True)``) has ``C`` and ``class_weight`` (``C`` for a bare classifier, ``clf__C`` in the default
    pipeline); :data:`DEFAULT_GRID` when it has not both."""
    wanted: dict[str, list[Any]] = {"C": C_VALUES, "class_weight": [None, "balanced"]}
    out = {paths[0]: list(values) for name, values in wanted.items() if (paths := _paths_of(params, name))}
    return out if len(out) == 2 else dict(DEFAULT_GRID)


def check_model(
    spec: dict[str, Any], seed: int, grid: dict[str, list[Any]] | None = None, default_grid: bool = False
) -> dict[str, list[Any]] | None:
    """Raise ``ValueError`` (one line naming ``model`` or ``search.grid``) unless ``spec`` builds into an estimator
    with ``fit`` and ``predict_proba`` and every value of ``grid`` (when given) applies to it. ``default_grid``: the
    grid is the default one, first addressed to the model (:func:`default_grid_for`). Returns the grid checked."""
    try:
        est = build_estimator(spec, seed)
    except ValueError as exc:
        raise ValueError(f"model: {exc}; check its _target_ paths and arguments") from None
    problem = estimator_problem(est)
    if problem:
        sep = "" if problem.startswith(":") else " "
        raise ValueError(f"model: {spec.get('_target_')}{sep}{problem}; choose an estimator that has one")
    if grid is None:
        return None
    params = est.get_params(deep=True)
    if default_grid:
        grid = default_grid_for(params)
    for key, values in grid.items():
        if key not in params:
            close = sorted(_paths_of(params, key.rpartition("__")[2]))
            hint = f"; did you mean {', '.join(close)}?" if close else "; set search.grid for this model"
            raise ValueError(f"search.grid: {key!r} is not a parameter of the model {type(est).__name__}{hint}")
        if not values:
            raise ValueError(f"search.grid.{key}: give at least one value")
        for value in values:
            try:
                problem = estimator_problem(build_estimator(spec, seed, {key: value}))
            except ValueError as exc:
                raise ValueError(f"search.grid.{key}: {exc}") from None
            if problem:
                raise ValueError(f"search.grid.{key}={value!r}: the model {problem.lstrip(': ')}")
    return grid
