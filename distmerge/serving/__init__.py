"""Serving committed checkpoints over vLLM's OpenAI-compatible API (`distmerge serve`).

- `VLLMServer` (server.py): one vLLM server process for one checkpoint, in its own process group.
- `ServeReplicas` (replicas.py): several vLLM replicas behind one endpoint, with Ray Serve LLM.
- model.py: which checkpoint a URL names (checkpoint, publish root or latest.json), the refusal of anything
  not committed, the local copy vLLM loads and the default chat template.

Importing this package imports neither vLLM nor Ray.
"""

from distmerge.serving.model import ServedModel, prepare, resolve_checkpoint
from distmerge.serving.replicas import ServeReplicas
from distmerge.serving.server import ServerError, VLLMServer

__all__ = ["ServeReplicas", "ServedModel", "ServerError", "VLLMServer", "prepare", "resolve_checkpoint"]
