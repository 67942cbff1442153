"""One battery of checks against every registered method."""

from __future__ import annotations

import dataclasses

import pytest
from approx_fixtures import fit_model, make_problem

from approx import (
    ClassForget,
    RandomForget,
    SubclassForget,
    get_method,
    list_methods,
    run_method,
)
from approx.base import register
from sisa_ray.core.checkpoint import states_identical

SMALL = {  # keep the suite fast: fewer epochs where the defaults train for long
    "twin_mu": {"twin_epochs": 2, "classifier_epochs": 20, "epochs": 1},
    "fisher_masking": {"epochs": 3},
    "finetune": {"epochs": 1},
}


@pytest.fixture(scope="module")
def problems(digits):
    """A trained model with unlearning data for each request kind."""
    train, _, _ = make_problem(digits)
    model = fit_model(train)
    out = {}
    for request in (RandomForget(fraction=0.1), ClassForget(label=3),
                    SubclassForget(label=3, fraction=0.5)):
        out[request.kind] = (model, make_problem(digits, request=request)[2])
    return out


@pytest.fixture(scope="module")
def problem(problems):
    return problems["random"]


def supported(problems, name):
    return problems[get_method(name).kinds[0]]


def small_config(name):
    spec = get_method(name)
    return dataclasses.replace(spec.default_config(), **SMALL.get(name, {}))


def test_registry_lists_the_required_methods():
    assert set(list_methods()) >= {
        "finetune", "random_labels", "fisher_forgetting", "fisher_masking", "ssd", "twin_mu",
        "negative_gradient", "bad_teacher", "random_perturbation", "pbu", "adversarial",
        "layer_reset",
    }
    with pytest.raises(ValueError, match=r"Unknown unlearning method 'sdd'. Known methods: \["):
        get_method("sdd")


def test_registry_refuses_duplicates():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        pass

    with pytest.raises(ValueError, match="already registered"):
        register("ssd", config=Cfg)(lambda *a: None)


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, problems):
    model, data = supported(problems, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = small_config(name)
    a = run_method(name, model, data, cfg, seed=3)
    b = run_method(name, model, data, cfg, seed=3)
    # the input model is unchanged
    assert states_identical(before, model.state_dict()) == []
    # same architecture
    assert type(a.model) is type(model)
    assert {k: v.shape for k, v in a.model.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    # deterministic for a seed, and it did change the model
    assert states_identical(a.model.state_dict(), b.model.state_dict()) == []
    assert states_identical(a.model.state_dict(), model.state_dict()) != []
    assert a.seconds > 0


@pytest.mark.parametrize("name", list_methods())
def test_missing_data_is_named(name, problems):
    model, data = supported(problems, name)
    spec = get_method(name)
    for need in spec.needs:
        broken = dataclasses.replace(data, **{need: None})
        with pytest.raises(ValueError, match=f"needs a non-empty '{need}' set"):
            run_method(name, model, broken, small_config(name))


@pytest.mark.parametrize("name", list_methods())
def test_request_kinds_are_declared_and_enforced(name, problems):
    spec = get_method(name)
    for kind, (model, d) in problems.items():
        if kind in spec.kinds:
            continue
        with pytest.raises(ValueError, match=f"does not support '{kind}'"):
            run_method(name, model, d, small_config(name))


def test_wrong_config_type_is_refused(problem):
    model, data = problem
    with pytest.raises(TypeError, match="takes a SSDConfig"):
        run_method("ssd", model, data, get_method("finetune").default_config())


def test_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="'alpha' parameter of SSDConfig"):
        get_method("ssd").config_cls(alpha=0)
    with pytest.raises(ValueError, match="'mask_ratio' parameter of FisherMaskingConfig"):
        get_method("fisher_masking").config_cls(mask_ratio=2)
    with pytest.raises(ValueError, match="'lr' parameter of FinetuneConfig"):
        get_method("finetune").config_cls(lr=True)
    with pytest.raises(ValueError, match="'shift_max' parameter of RandomLabelsConfig"):
        get_method("random_labels").config_cls(shift_min=5.0, shift_max=2.0)
    with pytest.raises(TypeError):
        get_method("finetune").config_cls(epoch=3)


def test_data_must_be_unlearning_data(problem):
    model, data = problem
    with pytest.raises(TypeError, match="UnlearningData"):
        run_method("finetune", model, {"forget": data.forget})
