"""`adapterzoo serve`: load the base, build engine + router + tenants, run HTTP (or Ray Serve)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

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


def run_serve(base: str, host: str, port: int, adapters_dir: Path | None, keys_file: Path | None, base_name: str | None,
              slots: int, max_batch: int, max_queue: int, max_host: int | None, registry: str | None,
              registry_token: str | None, registry_namespace: str | None, device: str | None, dtype: str | None,
              drain_timeout: float, default_max_tokens: int, ray: bool, replicas: int, log_level: str) -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = base_name or base_name_of(base)
    if keys_file is not None:  # fail before loading the base
        from .tenants import Tenants

        Tenants.load(keys_file)
    options = dict(base=base, base_name=name, adapters_dir=adapters_dir, keys_file=keys_file, slots=slots,
                   max_batch=max_batch, max_queue=max_queue, max_host=max_host, registry_endpoint=registry,
                   registry_token=registry_token, registry_namespace=registry_namespace, device=device, dtype=dtype,
                   default_max_tokens=default_max_tokens, drain_timeout=drain_timeout)
    if ray:
        from .ray import run_ray

        run_ray(options, host=host, port=port, replicas=replicas)
        return
    from .http import build_server, create_app, serve

    zoo = load_zoo(base, slots=slots, device=device, dtype=dtype)
    server = build_server(zoo, base_name=name, adapters_dir=adapters_dir, keys_file=keys_file, max_batch=max_batch,
                          max_queue=max_queue, max_host=max_host, registry_endpoint=registry, registry_token=registry_token,
                          registry_namespace=registry_namespace, default_max_tokens=default_max_tokens,
                          drain_timeout=drain_timeout)
    click.echo(f"serving {name!r} ({len(server.router.catalog)} adapters) on http://{host}:{port}/v1", err=True)
    serve(create_app(server), host=host, port=port, log_level=log_level, drain_timeout=drain_timeout)
