"""Approximate unlearning methods and unlearning metrics (pure PyTorch + scikit-learn; no Ray).

>>> from approx import list_methods, run_method, UnlearningData, RandomForget  # doctest: +SKIP
>>> result = run_method("ssd", model, UnlearningData(forget=f, retain=r, request=req))  # doctest: +SKIP
"""

from .base import UnlearningData, UnlearnResult, get_method, list_methods, register, run_method
from .requests import ClassForget, RandomForget, SubclassForget, parse_request, split_forget

__all__ = [
    "ClassForget", "RandomForget", "SubclassForget", "UnlearningData", "UnlearnResult",
    "get_method", "list_methods", "parse_request", "register", "run_method", "split_forget",
]
