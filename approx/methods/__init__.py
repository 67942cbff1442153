"""Built-in methods; importing this package registers them (one module each)."""

from . import (  # noqa: F401
    adversarial,
    bad_teacher,
    finetune,
    fisher_forgetting,
    fisher_masking,
    layer_reset,
    negative_gradient,
    pbu,
    random_labels,
    random_perturbation,
    ssd,
    twin_mu,
)
