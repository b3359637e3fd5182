"""A model's float64 program, assembled from its layers, and the float64 twin that runs it.

Every layer that can appear in a certified model owns its certificate, written next to its
``forward`` (docs/EXTENDING.md, Adding an activation):

    lipschitz_bound() -> float          a sound bound of its L2 Lipschitz constant
    rounding_steps(name) -> [Step]      its forward as float64 ``lipnext.rounding`` steps,
                                        each with its Lipschitz and rounding bounds

and a model owns two programs, assembled from its layers with ``steps_of`` / ``affine_of``:

    rounding_program() -> [Step]        forward_features
    head_program() -> (W, b)            forward_head, an affine map z = W f + b

A layer calls ``steps_of(child, name)`` / ``lipschitz_of(child, name)`` for its sub-layers.
Nothing is trusted by default; ``Float64Twin(model)`` refuses (``NotCertifiable``, naming
the module's path and what it must provide):

* a module with parameters or buffers, or any other non-container module (an activation),
  that is not part of the program (no layer's ``steps_of`` reached it), or whose class does
  not declare both methods;
* a class that overrides an inherited method below the class that wrote its program (a
  subclass changing ``forward``, ``forward_features``, ``forward_head`` or a helper of them
  without its own program: a temperature-scaled head, a different activation);
* a method replaced on the instance, and forward hooks (module or global). A wrapper that
  computes the same function (activation checkpointing) is marked with ``same_function``.

torch's ``nn.Identity``, ``nn.Sequential`` and ``nn.Linear`` (as a head) carry their
programs here; ``nn.ModuleList`` and ``nn.ModuleDict`` are containers.
"""
from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from .digest import tensors_sha256
from .modes import evaluating, standard_numerics
from .ops.registry import reference_only
from .rounding import Step, program_lipschitz

__all__ = ["NotCertifiable", "Float64Twin", "affine_of", "check_model", "known_bounds", "float64_twin",
           "float64_twin_or_none", "head_program", "lipschitz_of", "same_function", "state_fingerprint",
           "steps_of", "trunk_program"]

LAYER_METHODS = ("lipschitz_bound", "rounding_steps")
# Methods a subclass may override without writing its own program: construction, printing,
# the bound (certification checks any claimed bound against the program), state loading.
_NEUTRAL = frozenset({"__init__", "__repr__", "extra_repr", "lipschitz_bound", "lipschitz_factors",
                      "_load_from_state_dict", "__setstate__", "__getstate__", "reset_parameters"})
_SAME = "_lipnext_same_function"
_COVERED: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("lipnext_covered", default=None)
_PATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("lipnext_path", default=())
_KNOWN: contextvars.ContextVar[dict[int, float]] = contextvars.ContextVar("lipnext_known", default={})


class NotCertifiable(TypeError):
    """A model or a layer without its own certificate (a bound and a float64 program)."""


def same_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a replacement of a module's ``forward`` that computes exactly what the module's own
    ``forward`` computes (e.g. activation checkpointing): certification keeps its program."""
    setattr(fn, _SAME, True)
    return fn


def _owner(cls: type, name: str) -> type | None:
    """The class of ``cls``'s MRO that defines ``name``."""
    return next((k for k in cls.__mro__ if name in k.__dict__), None)


def _check_overrides(cls: type, program: str, path: str, what: str) -> None:
    """No class between ``cls`` and the owner of ``program`` overrides an inherited method."""
    owner = _owner(cls, program)
    for k in cls.__mro__:
        if k is owner:
            return
        for name, value in vars(k).items():
            if name in _NEUTRAL or not (callable(value) or isinstance(value, (staticmethod, classmethod,
                                                                                property))):
                continue
            if any(name in vars(base) for base in k.__mro__[1:]):
                raise NotCertifiable(
                    f"{path} ({cls.__name__}): {k.__name__}.{name} overrides an inherited method, but "
                    f"the {what} it runs was written by {owner.__name__}; give {k.__name__} its own "
                    f"{program}() (docs/EXTENDING.md), or certify the unmodified class")


def _check_instance(module: nn.Module, path: str) -> None:
    """No method replaced on the instance (but a ``same_function`` forward), no forward hooks."""
    for name, value in vars(module).items():
        if (not callable(value) or name in _NEUTRAL or not callable(getattr(type(module), name, None))
                or (name == "forward" and getattr(value, _SAME, False))):
            continue
        raise NotCertifiable(f"{path} ({type(module).__name__}): its {name} was replaced on the "
                             "instance, so its certificate no longer describes it; use the class "
                             "unmodified (or a subclass with its own program)")
    hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks") if getattr(module, h, None)]
    if hooks:
        raise NotCertifiable(f"{path} ({type(module).__name__}) has forward hooks, which may change "
                             "what it computes: remove them before certifying")


def _check_declared(module: nn.Module, path: str) -> None:
    """The layer declares both methods of its certificate."""
    missing = [m for m in LAYER_METHODS if not callable(getattr(module, m, None))]
    if missing:
        raise NotCertifiable(
            f"{path} ({type(module).__name__}) cannot be certified: it does not declare "
            f"{' and '.join(f'{m}()' for m in missing)}. Every layer of a certified model needs "
            "lipschitz_bound() (a sound bound of its L2 Lipschitz constant) and rounding_steps(name) "
            "(its forward as lipnext.rounding steps with their rounding bounds), next to its forward "
            "(docs/EXTENDING.md, Adding an activation)")


def _check_layer(module: nn.Module, path: str) -> None:
    """The layer declares its certificate, and nothing overrides or replaces what its program describes."""
    _check_declared(module, path)
    _check_overrides(type(module), "rounding_steps", path, "forward")
    _check_instance(module, path)


def _cover(module: nn.Module) -> None:
    covered = _COVERED.get()
    if covered is not None:
        covered.update(id(m) for m in module.modules())


def steps_of(module: nn.Module, name: str) -> list[Step]:
    """The float64 steps of ``module`` at path ``name``, after checking that it owns them."""
    if type(module) is nn.Identity:
        _cover(module)
        return []
    if type(module) is nn.Sequential:
        _cover(module)
        return [s for i, child in enumerate(module) for s in steps_of(child, f"{name}.{i}")]
    _check_layer(module, name)
    _cover(module)
    return list(module.rounding_steps(name))


@contextmanager
def known_bounds(bounds: dict[nn.Module, float]) -> Iterator[None]:
    """Inside, ``lipschitz_of`` answers for these modules with the given bound (after the same
    checks) instead of calling their ``lipschitz_bound()``: bounds computed elsewhere, as each
    FSDP block's on the rank that holds it whole (``engine.distributed.lipschitz_bound``)."""
    token = _KNOWN.set({id(m): float(v) for m, v in bounds.items()})
    try:
        yield
    finally:
        _KNOWN.reset(token)


def lipschitz_of(module: nn.Module, name: str) -> float:
    """The ``lipschitz_bound()`` of ``module`` named ``name`` by its parent (its path in errors
    is the parents' names and its own), after checking that it declares a certificate. (A
    claim: wrappers that keep the function, like FSDP's, are allowed here; certification
    checks the program and the claim against it.)"""
    parents = _PATH.get()
    path = ".".join((*parents, name))
    if type(module) is nn.Identity:
        return 1.0
    token = _PATH.set((*parents, name))
    try:
        if type(module) is nn.Sequential:
            return math.prod(lipschitz_of(child, str(i)) for i, child in enumerate(module))
        _check_declared(module, path)
        known = _KNOWN.get().get(id(module))
        return float(module.lipschitz_bound()) if known is None else known
    finally:
        _PATH.reset(token)


def affine_of(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) in float64 of a head z = W f + b at path ``name``: its ``affine_map()`` (or an ``nn.Linear``)."""
    _cover(module)
    if type(module) is nn.Linear:
        w = module.weight.detach()
        b = module.bias.detach() if module.bias is not None else w.new_zeros(w.shape[0])
        return w.to(torch.float64), b.to(torch.float64)
    if not callable(getattr(module, "affine_map", None)):
        raise NotCertifiable(f"{name} ({type(module).__name__}) cannot be certified as a head: it does "
                             "not declare affine_map() -> (W, b), the affine map z = W f + b its forward "
                             "computes (docs/EXTENDING.md, Adding an activation)")
    _check_overrides(type(module), "affine_map", name, "forward")
    _check_instance(module, name)
    w, b = module.affine_map()
    return w.detach().to(torch.float64), b.detach().to(torch.float64)


_MODEL_PROGRAMS = {"forward_features": ("rounding_program",), "forward_head": ("head_program",),
                   "forward": ("rounding_program", "head_program")}


def check_model(model: nn.Module) -> None:
    """Refuse a model whose own computation is not covered by its two programs (module doc)."""
    cls = type(model)
    for meth in ("rounding_program", "head_program"):
        if not callable(getattr(model, meth, None)):
            raise NotCertifiable(f"{cls.__name__} cannot be certified: it has no {meth}() (a certifiable "
                                 "model assembles its float64 program from its layers; docs/EXTENDING.md, "
                                 "Adding a model)")
    for meth, programs in _MODEL_PROGRAMS.items():
        owner = _owner(cls, meth)
        for program in programs:
            if owner is not None and not issubclass(_owner(cls, program), owner):
                raise NotCertifiable(
                    f"{cls.__name__} overrides {meth}() (in {owner.__name__}) but not {program}(), so "
                    f"the program it would be certified on is {_owner(cls, program).__name__}'s, not "
                    f"what it computes; give {owner.__name__} its own {program}()")
    if _owner(cls, "__call__") is not nn.Module:
        raise NotCertifiable(f"{cls.__name__} overrides __call__: its float64 program cannot describe it")
    _check_instance(model, cls.__name__)
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        raise NotCertifiable("global forward hooks are registered (torch.nn.modules.module."
                             "register_module_forward_hook): remove them before certifying")


@contextmanager
def _coverage() -> Iterator[set[int]]:
    covered: set[int] = set()
    token = _COVERED.set(covered)
    try:
        yield covered
    finally:
        _COVERED.reset(token)


def _check_coverage(model: nn.Module, covered: set[int]) -> None:
    for path, module in model.named_modules():
        if not path or id(module) in covered or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        raise NotCertifiable(
            f"{path} ({type(module).__name__}) is not part of {type(model).__name__}'s float64 program: "
            "every layer that forward_features or forward_head uses must enter rounding_program() or "
            "head_program() (through lipnext.program.steps_of / affine_of)")


def _assemble(model: nn.Module) -> tuple[list[Step], tuple[torch.Tensor, torch.Tensor]]:
    check_model(model)
    with torch.no_grad(), _coverage() as covered:
        steps = list(model.rounding_program())
        head = model.head_program()
    _check_coverage(model, covered)
    return steps, head


def trunk_program(model: nn.Module) -> list[Step]:
    """The float64 program of ``model.forward_features`` (model in eval mode), checked."""
    return _assemble(model)[0]


def head_program(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) in float64 of ``model.forward_head``, checked."""
    return _assemble(model)[1]


def state_fingerprint(model: nn.Module) -> str:
    """``lipnext.digest.tensors_sha256`` of the model's state dict (parameters and buffers)."""
    return tensors_sha256(model.state_dict())


class Float64Twin(nn.Module):
    """The model's trunk and head in float64, as certification computes them: the program
    (``steps``), the head (``weight``, ``bias``), the program's Lipschitz bound (as computed and
    rounded up) and the fingerprint of the weights it was built from."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.steps, (w, b) = _assemble(model)
        self.weight, self.bias = w, b
        self.lipschitz, self.lipschitz_upper = program_lipschitz(self.steps)
        self.fingerprint = state_fingerprint(model)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float64)
        with reference_only():               # the arithmetic the rounding bounds describe
            for step in self.steps:
                h = step.fn(h)
        return h

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.weight.mT + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@torch.no_grad()
def float64_twin(model: nn.Module) -> Float64Twin:
    """The float64 twin of ``model`` (eval mode, autocast off): the predictions it computes
    are the ones a certificate of ``lipnext.certify`` covers, with the exact model's."""
    with evaluating(model), standard_numerics(model):
        return Float64Twin(model)


def float64_twin_or_none(model: nn.Module) -> Float64Twin | None:
    """``float64_twin(model)``, or None for a model that cannot be certified."""
    try:
        return float64_twin(model)
    except NotCertifiable:
        return None

