"""An app serving only some of the basic tasks: messages for the others get dead-lettered."""

from __future__ import annotations

from taskq import App

from .basic import add

app = App()
app.task(add)
