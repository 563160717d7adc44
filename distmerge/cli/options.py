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


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'256MiB', '1GB', '1048576' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise click.BadParameter(f"{text!r} is not a size; use e.g. 256MiB, 1GB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def run_option_flags(model, skip: tuple[str, ...] = ()):
    """Click options generated from a pydantic model's fields: one definition, one docstring per setting."""
    import types
    from typing import Literal, Union, get_args, get_origin

    def decorate(fn):
        for name, field in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            flag = "--" + name.replace("_", "-")
            annotation = field.annotation
            if get_origin(annotation) in (Union, types.UnionType):  # `int | None`: the flag takes an int
                annotation = next(a for a in get_args(annotation) if a is not type(None))
            kwargs = {"default": None, "help": f"{field.description} [default: {field.default}]"}
            if annotation is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", name, **kwargs)(fn)
                continue
            if get_origin(annotation) is Literal:
                kwargs["type"] = click.Choice(get_args(annotation))
            elif name.endswith("size"):
                kwargs["type"] = click.UNPROCESSED
                kwargs["callback"] = lambda ctx, param, v: None if v is None else parse_size(v)
            elif annotation in (int, float):
                kwargs["type"] = annotation
            fn = click.option(flag, name, **kwargs)(fn)
        return fn

    return decorate


def build_run_options(model, values: dict):
    """The model from CLI values, leaving unset flags at the model's defaults."""
    from pydantic import ValidationError

    from distmerge.errors import RecipeError

    chosen = {k: v for k, v in values.items() if k in model.model_fields and v is not None}
    try:
        return model(**chosen)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RecipeError(f"option --{first['loc'][0].replace('_', '-')}: {first['msg']} "
                          f"(got {first.get('input')!r})") from None
