"""Which checkpoint a serving URL names, whether it may be served, and the local folder vLLM loads.

Key decisions:
- A URL may name a checkpoint, a publish root (`<root>/latest.json` inside) or the pointer itself: serving "the
  published model" means following the pointer that `distmerge.production.publish` moves on each promotion,
  so a server started from the root always loads the last model whose gates passed.
- Only committed checkpoints are served. A distmerge commit writes the index last, so a folder without
  `model.safetensors.index.json` (or the single-file `model.safetensors`) is a merge in progress or a crash;
  staging folders (`.<name>.distmerge-staging`) hold shards that never verified. Both are refused before
  anything is copied.
- vLLM loads local folders: remote checkpoints are copied once into a cache keyed by their listing
  (`local_checkpoint`, shared with evaluation), so restarting a server does not download again.
- Checkpoints without a chat template (base models, the testbed) get a plain one shipped here, so
  `/v1/chat/completions` answers instead of failing every request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.errors import CheckpointError
from distmerge.production.publish import POINTER_NAME
from distmerge.storage import Location

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
STAGING_SUFFIX = ".distmerge-staging"
DEFAULT_CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


@dataclass(frozen=True)
class ServedModel:
    """A checkpoint ready for vLLM: its URL, the local folder to load, the chat template to pass (if any) and
    the default served model name."""

    url: str
    local_dir: str
    chat_template: str | None
    name: str


def resolve_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """The committed checkpoint that `url` names: itself, or the one a `latest.json` pointer names."""
    source = Location(url, storage_options)
    if source.name == POINTER_NAME:
        return _follow_pointer(source)
    if is_committed(source):
        return source
    if source.child(POINTER_NAME).exists():
        return _follow_pointer(source.child(POINTER_NAME))
    raise not_committed(source)


def is_committed(source: Location) -> bool:
    if source.name.endswith(STAGING_SUFFIX):
        return False
    return source.child(INDEX_NAME).exists() or source.child(SINGLE_FILE_NAME).exists()


def not_committed(source: Location) -> CheckpointError:
    if source.name.endswith(STAGING_SUFFIX):
        return CheckpointError("is a staging folder of a merge that was never committed; its shards are not a "
                               "checkpoint", file=source.url,
                               fix=f"serve the merge output ({source.name[1:-len(STAGING_SUFFIX)]}) once the merge "
                               "has finished, or resume the merge with `distmerge merge RECIPE --resume`")
    return CheckpointError(f"is not a committed checkpoint: no {INDEX_NAME} or {SINGLE_FILE_NAME} (a merge "
                           f"writes its index last, so it is still running or it crashed) and no {POINTER_NAME}",
                           file=source.url,
                           fix="wait for the merge to finish (or re-run it with --resume), or pass a checkpoint "
                           "folder or a publish root that holds latest.json")


def _follow_pointer(pointer: Location) -> Location:
    if not pointer.exists():
        raise CheckpointError("does not exist: nothing was published there yet", file=pointer.url,
                              fix="run the pipeline until a model passes its gates, or serve a checkpoint URL")
    try:
        url = json.loads(pointer.read_text())["url"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError('is not a publish pointer: expected a JSON object with a "url" field',
                              file=pointer.url, fix="serve the checkpoint URL directly") from None
    target = Location(url, pointer.options)
    if not is_committed(target):
        raise not_committed(target)
    logger.info("%s points at %s", pointer.url, target.url)
    return target


def has_chat_template(folder: str) -> bool:
    """Whether the tokenizer in `folder` brings its own chat template (in its config or a file beside it)."""
    root = Path(folder)
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return True
    config = root / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def prepare(url: str, storage_options: dict[str, Any] | None, cache_dir: str) -> ServedModel:
    """Resolve `url`, refuse anything but a committed checkpoint, copy it locally if remote, pick a template."""
    from distmerge.evaluation.engine import local_checkpoint

    source = resolve_checkpoint(url, storage_options)
    local_dir = str(Path(local_checkpoint(source, cache_dir)).absolute())
    template = None if has_chat_template(local_dir) else str(DEFAULT_CHAT_TEMPLATE)
    if template:
        logger.info("%s has no chat template: /v1/chat/completions uses distmerge's plain template (the "
                    "messages' contents joined by newlines, continued by the model): %s", source.url, template)
    return ServedModel(source.url, local_dir, template, default_name(url))


def default_name(url: str) -> str:
    """The served model name unless one is given: the last folder of the URL as the user wrote it, so a
    publish root keeps one name across promotions (clients need not learn each run's id)."""
    return url.rstrip("/").removesuffix("/" + POINTER_NAME).rsplit("/", 1)[-1]
