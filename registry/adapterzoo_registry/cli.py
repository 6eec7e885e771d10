"""`adapterzoo-registry serve`: run the registry under uvicorn."""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__
from .app import DEFAULT_LFS_THRESHOLD_BYTES, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PAGE_SIZE, create_app
from .auth import TokenFileError
from .guard import LOOPBACK_HOSTS
from .lfs import DEFAULT_MAX_CONCURRENT_UPLOADS, DEFAULT_MAX_OBJECT_BYTES, DEFAULT_QUEUE_WAIT_S


@click.group()
@click.version_option(__version__, prog_name="adapterzoo-registry")
def main() -> None:
    """Self-hosted registry for adapters, speaking the Hugging Face Hub API that `huggingface_hub` uses."""


@main.command()
@click.option(
    "--root", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder holding the repos."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option(
    "--tokens",
    "tokens_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON tokens file: {"tokens": {"<token>": {"user": "alice", "namespaces": {"alice": "write"}}}}.',
)
@click.option(
    "--open",
    "open_access",
    is_flag=True,
    help="Run without tokens: anyone who can reach the registry may create, overwrite and delete repos.",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="A name clients reach the server by (the Host header); repeat for more, '*' for any."
    " Default: the --host address, localhost, 127.0.0.1 and ::1.",
)
@click.option(
    "--max-upload-bytes",
    default=DEFAULT_MAX_UPLOAD_BYTES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest commit body accepted; bigger uploads get 413.",
)
@click.option(
    "--lfs-threshold-bytes",
    default=DEFAULT_LFS_THRESHOLD_BYTES,
    show_default=True,
    type=click.IntRange(min=0),
    help="Files bigger than this are uploaded through Git LFS (streamed, not inside the commit body) by clients"
    " sending 'X-Adapterzoo-Transfer: lfs' (adapterzoo push does); other clients send every file inline.",
)
@click.option(
    "--max-lfs-object-bytes",
    default=DEFAULT_MAX_OBJECT_BYTES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest single file accepted through LFS.",
)
@click.option(
    "--max-concurrent-uploads",
    default=DEFAULT_MAX_CONCURRENT_UPLOADS,
    show_default=True,
    type=click.IntRange(min=1),
    help="LFS uploads received at once; more wait their turn (see --upload-queue-seconds).",
)
@click.option(
    "--upload-queue-seconds",
    default=DEFAULT_QUEUE_WAIT_S,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long an LFS upload waits for its turn before it is told to retry (503).",
)
@click.option(
    "--namespace-quota-bytes",
    default=None,
    type=click.IntRange(min=1),
    help="Most bytes the repos of one namespace may hold (default: no quota).",
)
@click.option("--page-size", default=DEFAULT_PAGE_SIZE, type=click.IntRange(min=1), hidden=True)
@click.option("--log-level", default="info", show_default=True, help="uvicorn log level.")
def serve(
    root: Path,
    host: str,
    port: int,
    tokens_file: Path | None,
    open_access: bool,
    allowed_hosts: tuple[str, ...],
    max_upload_bytes: int,
    lfs_threshold_bytes: int,
    max_lfs_object_bytes: int,
    max_concurrent_uploads: int,
    upload_queue_seconds: float,
    namespace_quota_bytes: int | None,
    page_size: int,
    log_level: str,
) -> None:
    """Serve the repos under ROOT over HTTP."""
    import uvicorn

    if (tokens_file is None) == (not open_access):
        raise click.UsageError(
            "Give --tokens FILE, or --open to let anyone who can reach the registry write to it (not both)."
        )
    try:
        app = create_app(
            root, tokens_file=tokens_file, open_access=open_access, max_upload_bytes=max_upload_bytes,
            page_size=page_size, allowed_hosts=allowed_hosts or (host, *LOOPBACK_HOSTS),
            lfs_threshold_bytes=lfs_threshold_bytes, max_lfs_object_bytes=max_lfs_object_bytes,
            namespace_quota_bytes=namespace_quota_bytes, max_concurrent_uploads=max_concurrent_uploads,
            upload_queue_seconds=upload_queue_seconds,
        )  # fmt: skip
    except TokenFileError as error:
        raise click.ClickException(str(error)) from error
    if open_access:
        click.secho(
            "WARNING: --open: the registry is OPEN, anyone who can reach it may create, overwrite and delete repos.",
            fg="yellow",
            err=True,
        )
    click.echo(f"adapterzoo-registry {__version__}: serving {Path(root).resolve()} on http://{host}:{port}", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


if __name__ == "__main__":
    main()
