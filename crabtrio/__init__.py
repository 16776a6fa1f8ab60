"""crabtrio: an OpenAI-compatible LLM gateway on Trio with a durable, queryable audit log.

Serve it with `hypercorn crabtrio:app --worker-class trio`.
"""

from . import hypercorn_fixes
from .app import create_app as create_app

# hypercorn's workers are spawned processes that import this package: fix hypercorn in each.
hypercorn_fixes.install()

# Loads its config when serving starts; a bad config ends the worker with one line.
app = create_app(exit_on_startup_error=True)
