"""`adapterzoo-registry serve`: run the registry under uvicorn."""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__
from .app import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PAGE_SIZE, create_app
from .auth import TokenFileError


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
    help='JSON tokens file: {"tokens": {"<token>": {"user": "alice", "namespaces": {"alice": "write"}}}}.'
    " Without it, the registry is open to anyone.",
)
@click.option(
    "--max-upload-bytes",
    default=DEFAULT_MAX_UPLOAD_BYTES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest commit body accepted; bigger uploads get 413.",
)
@click.option("--page-size", default=DEFAULT_PAGE_SIZE, type=click.IntRange(min=1), hidden=True)
@click.option("--log-level", default="info", show_default=True, help="uvicorn log level.")
def serve(
    root: Path, host: str, port: int, tokens_file: Path | None, max_upload_bytes: int, page_size: int, log_level: str
) -> None:
    """Serve the repos under ROOT over HTTP."""
    import uvicorn

    try:
        app = create_app(root, tokens_file=tokens_file, max_upload_bytes=max_upload_bytes, page_size=page_size)
    except TokenFileError as error:
        raise click.ClickException(str(error)) from error
    if tokens_file is None:
        click.secho(
            "WARNING: no --tokens file given: the registry is OPEN, anyone who can reach it may create,"
            " overwrite and delete repos.",
            fg="yellow",
            err=True,
        )
    click.echo(f"adapterzoo-registry {__version__}: serving {Path(root).resolve()} on http://{host}:{port}", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


if __name__ == "__main__":
    main()
