"""Plugins: Python modules named in the config (`plugins`) or by `herl grade --plugin`,
imported when a run opens so that the checks they register exist before any stage runs."""

from __future__ import annotations

from collections.abc import Iterable

from schemas.errors import UserError


class PluginImportError(UserError, ImportError):
    """A plugin module named in the config (or by --plugin) cannot be imported."""


def import_plugins(modules: Iterable[str]) -> None:
    """Import modules that register checks (config `plugins`, `herl grade --plugin`)."""
    import importlib
    import re

    for name in modules:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise PluginImportError(f"plugin {name!r} (config 'plugins') is not a module name: give a dotted Python "
                                    "module name such as my_checks or my_pkg.checks, importable from the Python path")
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise PluginImportError(f"cannot import plugin module {name!r} (config 'plugins'): {exc}") from None
        except Exception as exc:  # the plugin's own code failed while it was imported
            raise PluginImportError(f"plugin module {name!r} (config 'plugins') raised {type(exc).__name__} when "
                                    f"imported: {exc}") from None
