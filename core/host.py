"""The plugin host: loads enabled plugins from entry points and collects what they register."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from prismkit.core import hookspecs

ENTRY_POINT_GROUP = "prismkit"
DEFAULT_PLUGINS_TOML = Path(__file__).resolve().parent.parent / "plugins.toml"

# Registry kinds, each filled by one hook.
KINDS: dict[str, str] = {
    "architectures": "register_architectures",
    "experts": "register_experts",
    "image_stems": "register_image_stems",
    "vision_backbones": "register_vision_backbones",
    "language_backbones": "register_language_backbones",
    "adaptors": "register_adaptors",
    "resamplers": "register_resamplers",
    "heads": "register_heads",
    "datasets": "register_datasets",
    "model_configs": "register_model_configs",
    "commands": "register_commands",
}


class PluginError(ValueError):
    """A plugin, a registration or a plugins.toml entry is wrong; the message says which."""


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: its entry-point name, distribution and the hooks it implements."""

    name: str
    module: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


@dataclass
class PluginsConfig:
    """What plugins.toml selects."""

    # entry-point names of the plugins to load; None loads every installed one
    plugins: list[str] | None = None
    # expert names a model may use; None allows every registered expert
    experts: list[str] | None = None

    @classmethod
    def load(cls, path: str | Path | None = None) -> PluginsConfig:
        path = Path(path) if path is not None else DEFAULT_PLUGINS_TOML
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise PluginError(f"plugins file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise PluginError(f"plugins file {path} is not valid TOML: {e}") from None
        unknown = set(data) - {"plugins", "experts"}
        if unknown:
            raise PluginError(
                f"{path}: unknown section(s) {sorted(unknown)}; expected [plugins], [experts]"
            )
        return cls(
            plugins=_names(data.get("plugins", {}), path, "plugins"),
            experts=_names(data.get("experts", {}), path, "experts"),
        )


def _names(section: dict[str, Any], path: Path, what: str) -> list[str] | None:
    enabled = section.get("enabled", "*")
    if enabled == "*":
        return None
    if not isinstance(enabled, list) or not all(isinstance(n, str) for n in enabled):
        raise PluginError(
            f'{path}: [{what}] enabled must be "*" or a list of names, got {enabled!r}'
        )
    return list(enabled)


class Registry:
    """Name -> component for one kind; remembers which plugin registered each name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._owner: dict[str, str] = {}

    def add(self, name: str, item: Any, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"plugin {plugin!r} registered a {self.kind} entry without a name: {item!r}"
            )
        if name in self._items:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {self._owner[name]!r} and by plugin {plugin!r}"
            )
        self._items[name] = item
        self._owner[name] = plugin

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise PluginError(
                f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items)) or '(none)'}"
            )
        return self._items[name]

    def owner(self, name: str) -> str:
        return self._owner[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items


@dataclass
class PluginHost:
    """Loaded plugins and everything they registered."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo]
    registries: dict[str, Registry]
    enabled_experts: list[str] | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, kind: str) -> Registry:
        registries = self.__dict__.get("registries", {})
        if kind in registries:
            return registries[kind]
        raise AttributeError(kind)

    def expert(self, name: str) -> type:
        """The expert class for ``name``, checking plugins.toml enabled it."""
        if self.enabled_experts is not None and name not in self.enabled_experts:
            raise PluginError(
                f"expert {name!r} is not enabled in plugins.toml; enabled: {', '.join(self.enabled_experts) or '(none)'}"
            )
        return self.registries["experts"].get(name)


def _register_callback(registry: Registry, plugin: str):
    def register(item: Any, value: Any = None) -> None:
        if registry.kind == "model_configs":
            registry.add(item, value, plugin)
        else:
            registry.add(getattr(item, "name", None), item, plugin)

    return register


def get_plugin_manager(
    config: PluginsConfig | str | Path | None = None,
    extra_plugins: Iterable[ModuleType | object] = (),
) -> PluginHost:
    """Load the plugins that ``config`` (a PluginsConfig or a plugins.toml path) enables.

    Plugins come from the ``prismkit`` entry-point group; ``extra_plugins`` are registered in
    addition (tests, notebooks). Registration is strict: a duplicate name raises.
    """
    if not isinstance(config, PluginsConfig):
        config = PluginsConfig.load(config)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)

    available = {ep.name: ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)}
    wanted = list(available) if config.plugins is None else config.plugins
    missing = [n for n in wanted if n not in available]
    if missing:
        raise PluginError(
            f"plugins.toml enables unknown plugin(s) {missing}; installed: {', '.join(sorted(available)) or '(none)'}"
        )
    infos: list[PluginInfo] = []
    skipped: dict[str, str] = {}
    for name in wanted:
        ep = available[name]
        try:
            module = ep.load()
        except ImportError as e:
            # An optional dependency is missing (detectron2, say): say so, do not crash the host.
            skipped[name] = f"{ep.value}: {e}"
            continue
        pm.register(module, name=name)
        dist = ep.dist
        infos.append(
            _info(pm, name, module, dist.name if dist else "?", dist.version if dist else "?")
        )
    for i, plugin in enumerate(extra_plugins):
        pname = getattr(plugin, "__name__", f"extra-{i}")
        pm.register(plugin, name=pname)
        infos.append(_info(pm, pname, plugin, "(registered in code)", "-"))
    pm.check_pending()

    registries = {kind: Registry(kind) for kind in KINDS}
    for kind, hook in KINDS.items():
        for impl in getattr(pm.hook, hook).get_hookimpls():
            impl.function(register=_register_callback(registries[kind], impl.plugin_name))

    if config.experts is not None:
        unknown = [e for e in config.experts if e not in registries["experts"]]
        if unknown:
            raise PluginError(
                f"plugins.toml enables unknown expert(s) {unknown}; registered: {', '.join(registries['experts'].names()) or '(none)'}"
            )
    return PluginHost(pm, infos, registries, config.experts, skipped)


def _info(
    pm: pluggy.PluginManager, name: str, module: object, dist: str, version: str
) -> PluginInfo:
    hooks = tuple(sorted(h.name for h in pm.get_hookcallers(module) or ()))
    return PluginInfo(name, getattr(module, "__name__", repr(module)), dist, version, hooks)


def import_object(path: str) -> Any:
    """``"package.module:attr"`` -> the object."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj
