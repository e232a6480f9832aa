"""An app module that imports a package that is not installed."""

import a_package_that_is_not_installed  # type: ignore[import-not-found]  # noqa: F401

from taskq import App

app = App()
