"""Options shared by several subcommands, defined once."""

from __future__ import annotations

import json

import click


def _parse_storage_options(ctx, param, value: str | None) -> dict:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc}); e.g. '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object")
    return parsed


storage_options_option = click.option(
    "--storage-options", "storage_options", default=None, callback=_parse_storage_options, envvar="DISTMERGE_STORAGE_OPTIONS",
    help="fsspec storage options as JSON (e.g. endpoint_url). Credentials are better left to the environment "
    "(AWS_* variables, profiles). Env: DISTMERGE_STORAGE_OPTIONS.",
)
