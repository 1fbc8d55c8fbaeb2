"""The public API of pyDVL 0.7.1's ``pydvl.influence``, written down from its source (tag v0.7.1 of
aai-institute/pyDVL, ``src/pydvl/influence/``), and where each name lives in twicediff.

``MODULES`` maps each pyDVL module to:

- ``twicediff``: the twicediff module that takes its place after the rename ``pydvl.influence`` →
  ``twicediff`` (``general`` also as ``twicediff.influence``, see ``ALIASES``);
- ``all``: pyDVL's ``__all__`` (None where the module has none);
- ``names``: every name a user can import from the module: the ones it defines and the ones it
  imports from its sibling modules of ``pydvl.influence``. Each maps to a spec:
    - ``"(a, b=1, *, c=None)"``: a function's signature as ``inspect.signature`` shows it;
    - ``("class", {member: spec})``: a class; a member spec is a signature (methods as looked up
      on the class: instance methods with ``self``, static and class methods without), or
      ``"property"`` / ``"attribute"``;
    - ``("enum", {member: value})``; ``("typevar", bound or constraints)``; ``"dict"``.
- ``not_carried``: names the pyDVL module imports from outside ``pydvl.influence`` (pyDVL's own
  utilities, third-party modules) that twicediff does not re-create.

tests/test_pydvl_api.py checks every entry; ``python tests/pydvl_0_7_1_api.py`` prints the table of
names and their twicediff homes (docs/pydvl_0.7.1_names.md).
"""
import inspect
import sys

_TD_METHODS = {
    "__init__": "(self, model, loss)",
    "tensor_type": "()",
    "parameters": "property",
    "num_params": "property",
    "grad": "(self, x, y, create_graph=False)",
    "hessian": "(self, x, y)",
    "mvp": "(grad_xy, v, backprop_on, *, progress=False)",
}
_TU_METHODS = {
    "einsum": "(equation, *operands)",
    "cat": "(a, **kwargs)",
    "stack": "(a, **kwargs)",
    "unsqueeze": "(x, dim)",
    "get_element": "(x, idx)",
    "slice": "(x, start, stop, axis=0)",
    "shape": "(x)",
    "reshape": "(x, shape)",
}
_INVERSE_HVP_RESULT = ("class", {"__init__": "(self, x, info)", "x": "attribute", "info": "attribute",
                                 "__iter__": "(self)"})
_TWICE_DIFFERENTIABLE = ("class", {"tensor_type": "()", "num_params": "property", "parameters": "property",
                                   "grad": "(self, x, y, create_graph=False)", "hessian": "(self, x, y)",
                                   "mvp": "(grad_xy, v, backprop_on, *, progress=False)"})
_TENSOR_UTILITIES = ("class", {**_TU_METHODS, "cat_gen": "(a, resulting_shape, model)",
                               "from_twice_differentiable": "(twice_diff)", "registry": "attribute"})
_INVERSION_METHOD = ("enum", {"Direct": "direct", "Cg": "cg", "Lissa": "lissa", "Arnoldi": "arnoldi"})
_INVERSION_REGISTRY = ("class", {"register": "(model_type, inversion_method, overwrite=False)",
                                 "get": "(model_type, inversion_method)",
                                 "call": "(inversion_method, model, training_data, b, hessian_perturbation, **kwargs)",
                                 "registry": "attribute"})
_SOLVE_HVP = "(inversion_method, model, training_data, b, *, hessian_perturbation=0.0, **kwargs)"
_INFLUENCE_TYPE = ("enum", {"Up": "up", "Perturbation": "perturbation"})
_COMPUTE_INFLUENCE_FACTORS = ("(model, training_data, test_data, inversion_method, *, hessian_perturbation=0.0, "
                              "progress=False, **kwargs)")
_COMPUTE_INFLUENCES = ("(differentiable_model, training_data, *, test_data=None, input_data=None, "
                       "inversion_method=InversionMethod.Direct, influence_type=InfluenceType.Up, "
                       "hessian_regularization=0.0, progress=False, **kwargs)")
_SOLVE_LINEAR = "(model, training_data, b, hessian_perturbation=0.0)"
_SOLVE_BATCH_CG = ("(model, training_data, b, hessian_perturbation=0.0, *, x0=None, rtol=1e-07, atol=1e-07, "
                   "maxiter=None, progress=False)")
_SOLVE_LISSA = ("(model, training_data, b, hessian_perturbation=0.0, *, maxiter=1000, dampen=0.0, scale=10.0, "
                "h0=None, rtol=0.0001, progress=False)")
_SOLVE_ARNOLDI = ("(model, training_data, b, hessian_perturbation=0.0, *, rank_estimate=10, krylov_dimension=None, "
                  "low_rank_representation=None, tol=1e-06, max_iter=None, eigen_computation_on_gpu=False)")
_LANCZOS = ("(hessian_vp, matrix_shape, hessian_perturbation=0.0, rank_estimate=10, krylov_dimension=None, "
            "tol=1e-06, max_iter=None, device=None, eigen_computation_on_gpu=False, torch_dtype=None)")
_MODEL_HESSIAN_LOW_RANK = ("(model, training_data, hessian_perturbation=0.0, rank_estimate=10, krylov_dimension=None, "
                           "tol=1e-06, max_iter=None, eigen_computation_on_gpu=False)")
_LOW_RANK = ("class", {"__init__": "(self, eigen_vals, projections)", "eigen_vals": "attribute",
                       "projections": "attribute", "device": "property", "to": "(self, device)"})
_TORCH_TD = ("class", _TD_METHODS)
_TORCH_TU = ("class", {**_TU_METHODS, "cat_gen": "(a, resulting_shape, model, axis=0)",
                       "twice_differentiable_type": "attribute"})
_GET_HVP_FUNCTION = "(model, loss, data_loader, use_hessian_avg=True, reverse_only=True, track_gradients=False)"
_ALIGN_STRUCTURE = "(source, target)"
_AS_TENSOR = "(a, warn=True, **kwargs)"
_FLATTEN = "(tensors)"
_TO_MODEL_DEVICE = "(x, model)"

MODULES = {
    "pydvl.influence": {
        "twicediff": "twicediff",
        "all": None,
        "names": {
            "InfluenceType": _INFLUENCE_TYPE,
            "compute_influence_factors": _COMPUTE_INFLUENCE_FACTORS,
            "compute_influences": _COMPUTE_INFLUENCES,
            "InversionMethod": _INVERSION_METHOD,
            "general": "module", "inversion": "module", "twice_differentiable": "module",
        },
        "not_carried": [],
    },
    "pydvl.influence.general": {
        "twicediff": "twicediff.general",
        "all": ["compute_influences", "InfluenceType", "compute_influence_factors"],
        "names": {
            "InfluenceType": _INFLUENCE_TYPE,
            "compute_influence_factors": _COMPUTE_INFLUENCE_FACTORS,
            "compute_influences_up": "(model, input_data, influence_factors, *, progress=False)",
            "compute_influences_pert": "(model, input_data, influence_factors, *, progress=False)",
            "influence_type_registry": "dict",
            "compute_influences": _COMPUTE_INFLUENCES,
            # imported from the sibling modules
            "InversionMethod": _INVERSION_METHOD,
            "solve_hvp": _SOLVE_HVP,
            "DataLoaderType": ("typevar", "Iterable"),
            "InverseHvpResult": _INVERSE_HVP_RESULT,
            "TensorType": ("typevar", "Sequence"),
            "TensorUtilities": _TENSOR_UTILITIES,
            "TwiceDifferentiable": _TWICE_DIFFERENTIABLE,
        },
        "not_carried": ["maybe_progress (pydvl.utils)", "logger", "deepcopy", "Enum", "typing names"],
    },
    "pydvl.influence.inversion": {
        "twicediff": "twicediff.inversion",
        "all": ["solve_hvp", "InversionMethod", "InversionRegistry"],
        "names": {
            "InversionMethod": _INVERSION_METHOD,
            "solve_hvp": _SOLVE_HVP,
            "InversionRegistry": _INVERSION_REGISTRY,
            "DataLoaderType": ("typevar", "Iterable"),
            "InverseHvpResult": _INVERSE_HVP_RESULT,
            "TensorType": ("typevar", "Sequence"),
            "TwiceDifferentiable": _TWICE_DIFFERENTIABLE,
        },
        "not_carried": ["functools", "inspect", "logging", "warnings", "logger", "Enum", "typing names"],
    },
    "pydvl.influence.twice_differentiable": {
        "twicediff": "twicediff.twice_differentiable",
        "all": ["DataLoaderType", "ModelType", "TensorType", "InverseHvpResult", "TwiceDifferentiable",
                "TensorUtilities"],
        "names": {
            "TensorType": ("typevar", "Sequence"),
            "ModelType": ("typevar", "TwiceDifferentiable"),
            "DataLoaderType": ("typevar", "Iterable"),
            "InverseHvpResult": _INVERSE_HVP_RESULT,
            "TwiceDifferentiable": _TWICE_DIFFERENTIABLE,
            "TensorUtilities": _TENSOR_UTILITIES,
        },
        "not_carried": ["ABC", "abstractmethod", "dataclass", "typing names"],
    },
    "pydvl.influence.torch": {
        "twicediff": "twicediff.torch",
        "all": None,
        "names": {
            "TorchTwiceDifferentiable": _TORCH_TD,
            "as_tensor": _AS_TENSOR,
            "model_hessian_low_rank": _MODEL_HESSIAN_LOW_RANK,
            "solve_arnoldi": _SOLVE_ARNOLDI,
            "solve_batch_cg": _SOLVE_BATCH_CG,
            "solve_linear": _SOLVE_LINEAR,
            "solve_lissa": _SOLVE_LISSA,
            "functional": "module", "torch_differentiable": "module", "util": "module",
        },
        "not_carried": [],
    },
    "pydvl.influence.torch.functional": {
        "twicediff": "twicediff.torch.functional",
        "all": ["get_hvp_function"],
        "names": {
            "hvp": "(func, params, vec, reverse_only=True)",
            "batch_hvp_gen": "(model, loss, data_loader, reverse_only=True)",
            "empirical_loss_function": "(model, loss, data_loader)",
            "batch_loss_function": "(model, loss, x, y)",
            "get_hvp_function": _GET_HVP_FUNCTION,
            "TorchTensorContainerType": ("typevar", ("Tensor", "Tuple[Tensor, ...]", "Dict[str, Tensor]")),
            "align_structure": _ALIGN_STRUCTURE,
            "flatten_tensors_to_vector": _FLATTEN,
            "to_model_device": _TO_MODEL_DEVICE,
            # torch's own, imported by pyDVL's module
            "functional_call": "torch", "grad": "torch", "jvp": "torch", "vjp": "torch", "DataLoader": "torch",
        },
        "not_carried": ["typing names"],
    },
    "pydvl.influence.torch.util": {
        "twicediff": "twicediff.torch.util",
        "all": ["to_model_device", "flatten_tensors_to_vector", "reshape_vector_to_tensors",
                "TorchTensorContainerType", "align_structure", "as_tensor"],
        "names": {
            "to_model_device": _TO_MODEL_DEVICE,
            "flatten_tensors_to_vector": _FLATTEN,
            "reshape_vector_to_tensors": "(input_vector, target_shapes)",
            "TorchTensorContainerType": ("typevar", ("Tensor", "Tuple[Tensor, ...]", "Dict[str, Tensor]")),
            "align_structure": _ALIGN_STRUCTURE,
            "as_tensor": _AS_TENSOR,
            "logger": "attribute",
        },
        "not_carried": ["logging", "math", "typing names"],
    },
    "pydvl.influence.torch.torch_differentiable": {
        "twicediff": "twicediff.torch.torch_differentiable",
        "all": ["TorchTwiceDifferentiable", "solve_linear", "solve_batch_cg", "solve_lissa", "solve_arnoldi",
                "lanzcos_low_rank_hessian_approx", "model_hessian_low_rank"],
        "names": {
            "TorchTwiceDifferentiable": _TORCH_TD,
            "LowRankProductRepresentation": _LOW_RANK,
            "lanzcos_low_rank_hessian_approx": _LANCZOS,
            "model_hessian_low_rank": _MODEL_HESSIAN_LOW_RANK,
            "TorchTensorUtilities": _TORCH_TU,
            "solve_linear": _SOLVE_LINEAR,
            "solve_batch_cg": _SOLVE_BATCH_CG,
            "solve_cg": "(hvp, b, *, x0=None, rtol=1e-07, atol=1e-07, maxiter=None)",
            "solve_lissa": _SOLVE_LISSA,
            "solve_arnoldi": _SOLVE_ARNOLDI,
            # imported from the sibling modules
            "InversionMethod": _INVERSION_METHOD,
            "InversionRegistry": _INVERSION_REGISTRY,
            "InverseHvpResult": _INVERSE_HVP_RESULT,
            "TensorUtilities": _TENSOR_UTILITIES,
            "TwiceDifferentiable": _TWICE_DIFFERENTIABLE,
            "get_hvp_function": _GET_HVP_FUNCTION,
            "align_structure": _ALIGN_STRUCTURE,
            "as_tensor": _AS_TENSOR,
            "flatten_tensors_to_vector": _FLATTEN,
        },
        "not_carried": ["maybe_progress (pydvl.utils)", "logger", "dataclass", "partial", "torch", "nn", "NDArray",
                        "ArpackNoConvergence", "autograd", "Variable", "DataLoader", "typing names"],
    },
}

# ---- the check, run against twicediff (tests/test_pydvl_api.py) and against pyDVL itself
# (benchmarks/compare_pydvl_dropin.py, in pyDVL's venv: exact=True, so that the list above is
# pyDVL's and not a transcription error) -------------------------------------------------------

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _reference_signature(text: str, module) -> inspect.Signature:
    namespace = {"InversionMethod": getattr(module, "InversionMethod", None),
                 "InfluenceType": getattr(module, "InfluenceType", None)}
    exec(f"def f{text}: pass", namespace)
    return inspect.signature(namespace["f"])


def _same(a: inspect.Parameter, b: inspect.Parameter) -> bool:
    return a.name == b.name and a.kind == b.kind and (a.default is b.default or a.default == b.default)


def check_signature(got: inspect.Signature, ref: inspect.Signature, exact: bool) -> str:
    """"" when ``got`` takes every call ``ref`` takes, binding it the same way: the same positional
    parameters in order (name, kind, default), the same keyword-only ones and ``*args``/``**kwargs``;
    extra parameters of ``got`` only with defaults (and none at all when ``exact``)."""
    g, r = list(got.parameters.values()), list(ref.parameters.values())
    if exact:
        return "" if len(g) == len(r) and all(map(_same, g, r)) else f"{got} != {ref}"
    g_pos = [p for p in g if p.kind in _POSITIONAL]
    r_pos = [p for p in r if p.kind in _POSITIONAL]
    if len(g_pos) < len(r_pos) or not all(map(_same, g_pos, r_pos)):
        return f"positional parameters of {got} differ from {ref}"
    by_name = {p.name: p for p in g}
    for p in r:
        if p.kind == inspect.Parameter.KEYWORD_ONLY and not (p.name in by_name and _same(by_name[p.name], p)):
            return f"keyword-only {p.name} of {ref} missing or different in {got}"
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) and \
                not any(q.kind == p.kind for q in g):
            return f"{got} lacks {p}"
    known = {p.name for p in r}
    extra = [p for p in g if p.name not in known and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                   inspect.Parameter.VAR_KEYWORD)]
    required = [p.name for p in extra if p.default is inspect.Parameter.empty]
    return f"{got}: extra parameters without a default {required}" if required else ""


def _check_member(cls, member: str, spec: str, module, exact: bool) -> str:
    if spec == "attribute":
        fields = getattr(cls, "__dataclass_fields__", {})
        return "" if member in fields or hasattr(cls, member) else f"{cls.__name__}.{member} missing"
    static = inspect.getattr_static(cls, member, None)
    if static is None:
        return f"{cls.__name__}.{member} missing"
    if spec == "property":
        return "" if isinstance(static, property) else f"{cls.__name__}.{member} is not a property"
    problem = check_signature(inspect.signature(getattr(cls, member)), _reference_signature(spec, module), exact)
    return f"{cls.__name__}.{member}: {problem}" if problem else ""


def check(module, entry: dict, exact: bool = False, all_superset: bool = False):
    """Problems of ``module`` against its entry of MODULES (an empty list when it conforms);
    ``all_superset``: its ``__all__`` may hold more names than pyDVL's (an alias module)."""
    import enum
    import typing

    problems = []
    if entry["all"] is not None:
        got = getattr(module, "__all__", None)
        if got is None or (list(got) != entry["all"] if exact else
                           not set(got) >= set(entry["all"]) if all_superset else set(got) != set(entry["all"])):
            problems.append(f"__all__ is {got}, pyDVL's is {entry['all']}")
    for name, spec in entry["names"].items():
        if not hasattr(module, name):
            problems.append(f"{name} missing")
            continue
        obj = getattr(module, name)
        if spec == "module":
            ok = inspect.ismodule(obj) and obj.__name__.endswith("." + name)
        elif spec == "dict":
            ok = isinstance(obj, dict)
        elif spec == "attribute":
            ok = True
        elif spec == "torch":
            import torch.func
            import torch.utils.data
            ok = obj is getattr(torch.func, name, None) or obj is getattr(torch.utils.data, name, None)
        elif isinstance(spec, str):
            problem = check_signature(inspect.signature(obj), _reference_signature(spec, module), exact)
            ok = not problem
            if problem:
                problems.append(f"{name}: {problem}")
                continue
        elif spec[0] == "enum":
            # every pyDVL member with its value; twicediff may add members (Ekfac, Kfac), pyDVL itself not
            members = {m.name: m.value for m in obj} if isinstance(obj, type) and issubclass(obj, enum.Enum) else {}
            ok = isinstance(obj, type) and issubclass(obj, enum.Enum) and issubclass(obj, str) and \
                (members == spec[1] if exact else members.items() >= spec[1].items())
        elif spec[0] == "typevar":
            if not isinstance(obj, typing.TypeVar):
                ok = False
            elif isinstance(spec[1], str):
                ok = spec[1] in repr(obj.__bound__)
            else:
                ok = len(obj.__constraints__) == len(spec[1]) and all(
                    word.split("[")[0] in repr(c) for word, c in zip(spec[1], obj.__constraints__))
        elif spec[0] == "class":
            if not isinstance(obj, type):
                problems.append(f"{name} is not a class")
                continue
            problems += [p for p in (_check_member(obj, m, s, module, exact) for m, s in spec[1].items()) if p]
            continue
        else:
            raise AssertionError(f"unknown spec {spec!r}")
        if not ok:
            problems.append(f"{name} does not match {spec!r}")
    return problems


# pyDVL module -> further twicediff modules that hold the same names.
ALIASES = {"pydvl.influence.general": ["twicediff.influence"]}


_FACES = {"twicediff", "twicediff.general", "twicediff.torch", "twicediff.torch.torch_differentiable"}


def _home(obj) -> str:
    """The twicediff module that defines ``obj`` (for the table): its ``__module__``, or for a value
    without one (a dict, a logger) the module other than the re-exporting faces that holds it."""
    module = getattr(obj, "__module__", None)
    if isinstance(module, str) and module.startswith("twicediff"):
        return module
    for name, mod in sorted(sys.modules.items()):
        if name.startswith("twicediff") and name not in _FACES and mod is not None and \
                any(value is obj for value in vars(mod).values()):
            return name
    return ""


def table() -> str:
    import importlib

    lines = ["# pyDVL 0.7.1's `pydvl.influence`, name by name, in twicediff", "",
             "Written from pyDVL 0.7.1's source (`src/pydvl/influence/` at tag v0.7.1) in",
             "`tests/pydvl_0_7_1_api.py`, checked by `tests/test_pydvl_api.py`; regenerate with",
             "`python tests/pydvl_0_7_1_api.py --write docs/pydvl_0.7.1_names.md`. Replace `pydvl.influence` by",
             "`twicediff` in an import and it finds the name in the second column; the third says which",
             "module of twicediff implements it. `in __all__` marks the names of pyDVL's `__all__`.", "",
             "| pyDVL 0.7.1 | twicediff | implemented in | in `__all__` |", "|---|---|---|---|"]
    for name, entry in MODULES.items():
        module = importlib.import_module(entry["twicediff"])
        for attr, spec in entry["names"].items():
            if spec == "torch":
                continue
            obj = getattr(module, attr)
            home = obj.__name__ if inspect.ismodule(obj) else _home(obj) or "?"
            star = "yes" if entry["all"] and attr in entry["all"] else ""
            lines.append(f"| `{name}.{attr}` | `{entry['twicediff']}.{attr}` | `{home}` | {star} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = table()
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        with open(sys.argv[2], "w") as f:
            f.write(text)
    print(text)
