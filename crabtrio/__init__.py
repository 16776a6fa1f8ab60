"""crabtrio: an OpenAI-compatible LLM gateway on Trio with a durable, queryable audit log.

Serve it with `hypercorn crabtrio:app --worker-class trio`.
"""

from .app import create_app as create_app

# Loads its config when serving starts; a bad config ends the worker with one line.
app = create_app(exit_on_startup_error=True)
