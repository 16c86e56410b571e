"""The HTTP routes of `tuneline serve`, one FastAPI router per resource: files, fine-tuning jobs (with
their events and checkpoints), models, chat completions. Handlers are thin: they parse the request
into its protocol model (tuneline/server/protocol.py), call a service (tuneline/server/services/),
and send the protocol model the service answers with.
"""

from __future__ import annotations

from tuneline.server.api import chat, files, fine_tuning, graders, models

ROUTERS = (files.router, fine_tuning.router, models.router, chat.router, graders.router)
