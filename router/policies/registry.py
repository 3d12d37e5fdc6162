"""The one registry of routing plugins: whole policies, profiles, filters, scorers and pickers.

    register("my_scorer", MyScorer)                    # from any package, no gpufleet edit
    policy = make("cache_aware", settings, seed=0, clock=time.monotonic)

A plugin is registered under a `kind` and a `type` name with a factory and a pydantic model of
its parameters (`Params`, validated by the plugin itself: an unknown parameter is an error).

- `policy`: `factory(settings, *, seed, clock, **needs) -> Policy`, a whole policy such as
  `round_robin` or the simulator's `oracle`; `needs` names context it cannot work without (the
  oracle needs the simulator's `engines`), which `make` passes from its own keyword arguments.
- `profile`: `factory(settings) -> ProfileSettings`, a named composition such as `cache_aware`
  (its parameters are a settings block of the `router:` section).
- `filter`, `scorer`, `picker`: `factory(params, ctx) -> Filter | Scorer | Picker`, the parts a
  profile composes (`ctx` is a `PluginContext`).

Built-ins register on import of `gpufleet.router.policies`; the simulator's baselines
(`gpufleet.router.sim.policies`) and the modules of the entry-point group
`gpufleet.router.plugins` are loaded the first time the registry is read, so every process sees
the same names. A `router:` section's `plugins` are imported (`load_plugin`) before it is read.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from gpufleet.router.config import ProfileSettings, RouterSettings
from gpufleet.router.policies.base import PluginContext, PluginError

if TYPE_CHECKING:
    from gpufleet.router.policies.policy import Policy

__all__ = [
    "ENTRY_POINT_GROUP",
    "Entry",
    "Kind",
    "NoParams",
    "PluginError",
    "entry",
    "is_policy",
    "load_entry_points",
    "load_plugin",
    "make",
    "make_part",
    "names",
    "parse_params",
    "policy_names",
    "policy_problem",
    "register",
    "unregister",
]

Kind = Literal["policy", "profile", "filter", "scorer", "picker"]
KINDS: tuple[Kind, ...] = ("policy", "profile", "filter", "scorer", "picker")
ENTRY_POINT_GROUP = "gpufleet.router.plugins"
# The simulator's baselines register on the registry's first read, not when it is imported (the
# simulator imports this package): every process then sees the same names, whatever it imported.
_LAZY_MODULES = ("gpufleet.router.sim.policies",)


class NoParams(BaseModel):
    """The parameters of a plugin that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Entry:
    """One registered plugin."""

    name: str
    kind: Kind
    factory: Callable[..., Any]
    params: type[BaseModel]
    needs: tuple[str, ...]
    """Context keys `make` must be given for this plugin (e.g. the simulator's `engines`)."""
    origin: str
    """The module that registered it (shown when a name is registered twice)."""


_PLUGINS: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
_loaded = False


def register(
    type_name: str,
    factory: Callable[..., Any],
    *,
    kind: Kind | None = None,
    params: type[BaseModel] | None = None,
    needs: Sequence[str] | None = None,
) -> None:
    """Register `factory` as the plugin `type_name`.

    A class declares what it is by its base (`Policy`, `Filter`, `Scorer`, `Picker` carry a
    `kind`), its parameters as a nested `Params` model and its context as `needs`; keyword
    arguments override (and are required for plain functions). Registering the same factory
    again is a no-op; another factory under a taken name is a `PluginError`.
    """
    kind = kind or getattr(factory, "kind", None)
    if kind not in KINDS:
        raise PluginError(f"cannot register {type_name!r}: give kind= (one of {', '.join(KINDS)})")
    params_model: type[BaseModel] = params if params is not None else getattr(factory, "Params", NoParams)
    plugin = Entry(
        name=type_name,
        kind=kind,
        factory=factory,
        params=params_model,
        needs=tuple(needs if needs is not None else getattr(factory, "needs", ())),
        origin=getattr(factory, "__module__", "?"),
    )
    table = _PLUGINS[kind]
    taken = table.get(type_name)
    if taken is not None and taken.factory is not factory:
        raise PluginError(f"{kind} {type_name!r} is already registered by {taken.origin}")
    if kind in ("policy", "profile") and type_name in _PLUGINS["profile" if kind == "policy" else "policy"]:
        raise PluginError(f"{type_name!r} is already registered as a policy or profile")
    table[type_name] = plugin


def unregister(kind: Kind, type_name: str) -> None:
    """Forget a plugin (tests that register their own)."""
    _PLUGINS[kind].pop(type_name, None)


def load_plugin(module: str) -> None:
    """Import a module that registers plugins; any failure is a `PluginError` with its message."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a user's module may fail in any way: report it, no traceback
        raise PluginError(f"cannot import plugin module {module!r}: {type(exc).__name__}: {exc}") from None


def load_entry_points() -> list[str]:
    """Load every entry point of the `gpufleet.router.plugins` group; the names loaded.

    An entry point names a module that registers its plugins on import, or a callable that does
    when called without arguments.
    """
    loaded = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as exc:  # as in load_plugin
            raise PluginError(
                f"cannot load plugin entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        loaded.append(ep.name)
    return loaded


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: the modules below read the registry while they register
    for module in _LAZY_MODULES:
        importlib.import_module(module)
    load_entry_points()


def names(kind: Kind) -> list[str]:
    """Registered names of one kind, sorted."""
    _ensure_loaded()
    return sorted(_PLUGINS[kind])


def entry(kind: str, type_name: str) -> Entry:
    """The plugin `type_name` of `kind`; a `PluginError` listing the registered names if none."""
    _ensure_loaded()
    table = _PLUGINS.get(kind)
    if table is None:
        raise PluginError(f"no plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    plugin: Entry | None = table.get(type_name)
    if plugin is None:
        raise PluginError(f"unknown {kind} {type_name!r}; registered {kind}s: {', '.join(sorted(table)) or 'none'}")
    return plugin


def parse_params(kind: str, type_name: str, params: Mapping[str, Any]) -> BaseModel:
    """The plugin's parameters validated by its own model.

    Raises a `ValidationError` located relative to `params` (so a `router:` section reports
    `...params.<name>` at its line); an unknown parameter lists the plugin's parameters.
    """
    model = entry(kind, type_name).params
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        unknown = (
            f"unknown parameter of {kind} {type_name!r}; its parameters: {', '.join(model.model_fields) or 'none'}"
        )
        details = [
            InitErrorDetails(type=PydanticCustomError("value_error", unknown), loc=err["loc"], input=err["input"])
            if err["type"] == "extra_forbidden"
            else InitErrorDetails(type=err["type"], loc=err["loc"], input=err["input"], ctx=err.get("ctx", {}))
            for err in exc.errors()
        ]
        raise ValidationError.from_exception_data(model.__name__, details) from None


def _missing(plugin: Entry, context: Collection[str]) -> PluginError | None:
    missing = [k for k in plugin.needs if k not in context]
    if not missing:
        return None
    return PluginError(
        f"{plugin.kind} {plugin.name!r} needs {', '.join(missing)} (context only the simulator gives), "
        "so a router cannot run it"
    )


def make_part(kind: str, type_name: str, params: Mapping[str, Any], ctx: PluginContext) -> Any:
    """Build the filter, scorer or picker `type_name` with its parameters for one policy."""
    plugin = entry(kind, type_name)
    problem = _missing(plugin, ctx.context)
    if problem is not None:
        raise problem
    parsed = parse_params(kind, type_name, params)
    return _build(plugin, lambda: plugin.factory(parsed, ctx))


def is_policy(name: str) -> bool:
    """True when `name` is a registered policy or profile."""
    _ensure_loaded()
    return name in _PLUGINS["policy"] or name in _PLUGINS["profile"]


def policy_names(context: Collection[str] = ()) -> list[str]:
    """Policies and profiles that can be built with the given context keys (none: a router's)."""
    _ensure_loaded()
    out = [n for n, p in _PLUGINS["policy"].items() if set(p.needs) <= set(context)]
    return sorted([*out, *_PLUGINS["profile"]])


def policy_problem(name: str, context: Collection[str] = (), profiles: Collection[str] = ()) -> str | None:
    """Why `make(name)` with these context keys would fail (None: it would not); `profiles` are
    the settings' own, which a name may also refer to."""
    _ensure_loaded()
    if name in _PLUGINS["profile"] or name in profiles:
        return None
    plugin = _PLUGINS["policy"].get(name)
    if plugin is None:
        choices = [repr(n) for n in sorted({*policy_names(context), *profiles})]
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else "".join(choices)
        return f"must be one of {listed} (the registered policies and profiles), not {name!r}"
    problem = _missing(plugin, context)
    return None if problem is None else str(problem)


def make(
    name: str,
    settings: RouterSettings | None = None,
    *,
    seed: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    **context: Any,
) -> Policy:
    """Build the policy or profile `name`: one of `settings.profiles`, else a registered one.

    `context` is what some plugins need to work (the simulator passes its `engines`); each
    plugin gets only what it declared, and one that lacks what it needs is a `PluginError`.
    """
    from gpufleet.router.policies.profile import ProfilePolicy  # it imports the plugins, which import this module

    s = settings if settings is not None else RouterSettings()
    profile: ProfileSettings | None = s.profiles.get(name)
    _ensure_loaded()
    if profile is None and name in _PLUGINS["profile"]:
        profile = _PLUGINS["profile"][name].factory(s)
    if profile is not None:
        return ProfilePolicy(name, profile, PluginContext(s, seed, clock, context))
    problem = policy_problem(name, context)
    if problem is not None:
        raise PluginError(problem)
    plugin = _PLUGINS["policy"][name]
    policy: Policy = _build(
        plugin, lambda: plugin.factory(s, seed=seed, clock=clock, **{k: context[k] for k in plugin.needs})
    )
    return policy


def _build(plugin: Entry, factory: Callable[[], Any]) -> Any:
    """Call a plugin's factory; a failure is a `PluginError` naming the plugin (chained to the cause)."""
    try:
        return factory()
    except PluginError:
        raise
    except Exception as exc:  # a user's plugin may fail in any way: say which one
        raise PluginError(
            f"cannot build {plugin.kind} {plugin.name!r} ({plugin.origin}): {type(exc).__name__}: {exc}"
        ) from exc
