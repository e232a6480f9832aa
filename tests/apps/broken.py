"""An app module whose import fails (for the CLI's error messages)."""

from taskq import App

app = App()
1 / 0  # noqa: B018
