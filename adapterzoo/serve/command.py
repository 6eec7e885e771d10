"""`adapterzoo serve`: load the base, build engine + router + tenants, run HTTP (or Ray Serve)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

MAX_BODY_BYTES = 4 * 2**20

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def base_name_of(base: str) -> str:
    return Path(base.rstrip("/")).name if os.sep in base or Path(base).exists() else base


def load_zoo(base: str, *, slots: int, device: str | None, dtype: str | None):
    import torch

    from ..zoo import Zoo

    kwargs = {"slots": slots, "device": device}
    if dtype:
        kwargs["dtype"] = getattr(torch, DTYPES[dtype])
    return Zoo.from_pretrained(base, **kwargs)


def server_from_options(options: dict):
    """Load the base and build its `Server` from `run_serve`'s options (the single-process server
    and every Ray replica build theirs this way)."""
    from .http import build_server

    zoo = load_zoo(options["base"], slots=options["slots"], device=options.get("device"), dtype=options.get("dtype"))
    return build_server(zoo, base_name=options["base_name"], adapters_dir=options.get("adapters_dir"),
                        keys_file=options.get("keys_file"), max_batch=options["max_batch"],
                        max_queue=options["max_queue"], max_host=options.get("max_host"),
                        registry_endpoint=options.get("registry_endpoint"), registry_token=options.get("registry_token"),
                        registry_namespace=options.get("registry_namespace"),
                        default_max_tokens=options.get("default_max_tokens", 16),
                        drain_timeout=options.get("drain_timeout", 30.0),
                        max_body_bytes=options.get("max_body_bytes") or MAX_BODY_BYTES,
                        max_prompt_chars=options.get("max_prompt_chars"),
                        stuck_after=options.get("stuck_after") or 60.0,
                        body_timeout=options.get("body_timeout") or 30.0)


def run_serve(base: str, host: str, port: int, adapters_dir: Path | None, keys_file: Path | None, base_name: str | None,
              slots: int, max_batch: int, max_queue: int, max_host: int | None, registry: str | None,
              registry_token: str | None, registry_namespace: str | None, device: str | None, dtype: str | None,
              drain_timeout: float, default_max_tokens: int, ray: bool, replicas: int, log_level: str,
              open_access: bool = False, max_body_bytes: int | None = None, max_prompt_chars: int | None = None,
              stuck_after: float | None = None, body_timeout: float | None = None) -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = base_name or base_name_of(base)
    if keys_file is not None:  # fail before loading the base
        from .tenants import Tenants

        Tenants.load(keys_file)
    from ..errors import InvalidConfigError
    from .http import check_open_mode

    try:  # open mode (no keys file): a warning on loopback; refused beyond it unless --open
        warning = check_open_mode(keys_file is None, host, open_access)
    except InvalidConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if warning:
        click.echo(warning, err=True)
    options = dict(base=base, base_name=name, adapters_dir=adapters_dir, keys_file=keys_file, slots=slots,
                   max_batch=max_batch, max_queue=max_queue, max_host=max_host, registry_endpoint=registry,
                   registry_token=registry_token, registry_namespace=registry_namespace, device=device, dtype=dtype,
                   default_max_tokens=default_max_tokens, drain_timeout=drain_timeout, max_body_bytes=max_body_bytes,
                   max_prompt_chars=max_prompt_chars, stuck_after=stuck_after, body_timeout=body_timeout)
    if ray:
        try:
            import ray as _ray  # noqa: F401
            from ray import serve as _serve  # noqa: F401
        except ImportError:
            raise click.ClickException(
                "--ray needs Ray Serve, which is not installed: pip install 'adapterzoo[ray]'") from None
        from .ray import run_ray

        run_ray(options, host=host, port=port, replicas=replicas)
        return
    from .http import create_app, serve

    server = server_from_options(options)
    click.echo(f"serving {name!r} ({len(server.router.catalog)} adapters) on http://{host}:{port}/v1", err=True)
    serve(create_app(server), host=host, port=port, log_level=log_level, drain_timeout=drain_timeout)
