"""`adapterzoo serve`: check the `ServeConfig`, load the base, build the server, run HTTP (or Ray Serve)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import click

from .config import ServeConfig
from .server import Server, server_from_config


def server_from_options(options: ServeConfig | Mapping[str, Any]) -> Server:
    """`server_from_config` for a config given as its fields in a dict (the older way to call it)."""
    return server_from_config(options if isinstance(options, ServeConfig) else ServeConfig(**options))


def run_serve(config: ServeConfig) -> None:
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.keys_file is not None:  # fail before loading the base
        from .tenants import Tenants

        Tenants.load(config.keys_file)
    from ..errors import InvalidConfigError
    from .http import check_open_mode

    try:  # open mode (no keys file): a warning on loopback; refused beyond it unless --open
        warning = check_open_mode(config.keys_file is None, config.host, config.open_access)
    except InvalidConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if warning:
        click.echo(warning, err=True)
    if config.ray:
        try:
            import ray as _ray  # noqa: F401
            from ray import serve as _serve  # noqa: F401
        except ImportError:
            raise click.ClickException(
                "--ray needs Ray Serve, which is not installed: pip install 'adapterzoo[ray]'"
            ) from None
        from .ray import run_ray

        run_ray(config)
        return
    from .http import create_app, serve

    server = server_from_config(config)
    click.echo(
        f"serving {config.base_name!r} ({len(server.adapters.catalog)} adapters) on "
        f"http://{config.host}:{config.port}/v1",
        err=True,
    )
    serve(
        create_app(server),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        drain_timeout=config.drain_timeout,
    )
