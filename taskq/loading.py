"""Finding the App a worker serves: ``-A module:attribute`` (or ``-A module``)."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from .app import App, default_app
from .errors import AppLoadError


def load_app(spec: str) -> App:
    """Import ``module[:attribute]`` and return the App it names, or raise AppLoadError.

    ``-A tasks`` means ``tasks:app`` if the module has an ``app``; otherwise the only App in
    the module; otherwise the default app, if the module registered tasks with ``taskq.task``.
    """
    spec = spec.strip()
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise AppLoadError(f"-A {spec!r}: name a module, e.g. -A tasks:app")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import(module_name)
    if attribute:
        try:
            candidate = module
            for part in attribute.split("."):
                candidate = getattr(candidate, part)
        except AttributeError:
            raise AppLoadError(
                f"module {module_name!r} has no attribute {attribute!r}: point -A at the "
                f"App object, e.g. -A {module_name}:app"
            ) from None
        if not isinstance(candidate, App):
            raise AppLoadError(
                f"{spec} is a {type(candidate).__name__}, not a taskq.App: point -A at the "
                "object made with App()"
            )
        return candidate
    found = getattr(module, "app", None)
    if isinstance(found, App):
        return found
    apps = [value for value in vars(module).values() if isinstance(value, App)]
    if len(apps) == 1:
        return apps[0]
    if len(apps) > 1:
        raise AppLoadError(
            f"module {module_name!r} holds several Apps: say which, -A {module_name}:NAME"
        )
    app = default_app()
    if any(task.fn.__module__ == module.__name__ for task in app.tasks.values()):
        return app
    raise AppLoadError(
        f"module {module_name!r} defines no taskq.App and no @taskq.task functions: point -A "
        f"at the App, e.g. -A {module_name}:app"
    )


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppLoadError(
                f"cannot import module {module_name!r}: it was not found in {os.getcwd()} "
                "or on PYTHONPATH; start the worker where the module lives, or set PYTHONPATH"
            ) from None
        raise AppLoadError(
            f"importing {module_name!r} failed: {exc} (a dependency of your module is missing)"
        ) from None
    except Exception as exc:
        raise AppLoadError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
