"""`adapterzoo ...`: the command line. Plugins can add commands (hook `register_commands`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import plugins


@click.group()
@click.version_option(package_name="adapterzoo")
def cli() -> None:
    """One frozen base transformer, many adapters of many types, one mixed batch."""


@cli.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_command(as_json: bool) -> None:
    """List the adapter types installed, and the distribution each comes from."""
    rows = [
        {
            "type": info.name,
            "kind": info.cls.kind,
            "plugin": info.plugin,
            "distribution": info.distribution or "(not installed as a distribution)",
            "version": info.version or "",
        }
        for info in sorted(plugins.adapter_types().values(), key=lambda i: i.name)
    ]
    # plugins that failed to import: listed too, with the error, so a missing type is explained
    rows += [
        {
            "type": None,
            "kind": None,
            "plugin": f.plugin,
            "distribution": f.distribution or "",
            "version": f.version or "",
            "error": f.error,
        }
        for f in sorted(plugins.failures.values(), key=lambda f: f.plugin)
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("type", "kind", "plugin", "distribution", "version")
    for r in rows:
        if r["type"] is None:
            table.add_row("[red]failed to load[/red]", "", r["plugin"], r["distribution"], r["version"])
        else:
            table.add_row(r["type"], r["kind"], r["plugin"], r["distribution"], r["version"])
    Console().print(table)
    for f in sorted(plugins.failures.values(), key=lambda f: f.plugin):
        click.echo(
            f"plugin {f.plugin!r} failed to load: {f.error} (skip it with ADAPTERZOO_DISABLE_PLUGINS={f.plugin})"
        )


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def ls(folder: Path) -> None:
    """List the adapters saved under FOLDER (one sub-folder each)."""
    from .formats.native import CONFIG_FILE
    from .storage import read_json

    found = sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}")) + (
        [folder] if (folder / CONFIG_FILE).exists() else []
    )
    if not found:
        click.echo(f"no adapters under {folder}")
        return
    for path in found:
        record = read_json(path / CONFIG_FILE)
        base = record.get("base", {}).get("id", "?")
        click.echo(
            f"{path.name:24} {record.get('adapter_type', '?'):12} base={base} "
            f"config={json.dumps(record.get('config', {}))}"
        )


@cli.command()
@click.option(
    "--base", default="smollm2", show_default=True, help="Base model: folder, Hub id, .gguf, 'smollm2' or 'minilm'."
)
@click.option("--max-new-tokens", default=16, show_default=True)
@click.option(
    "--specialists",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A library folder (adapterzoo library build --out) instead of the shipped specialists.",
)
@click.option("--all-types", is_flag=True, help="Instead: one (untrained) adapter of every installed type.")
def demo(base: str, max_new_tokens: int, specialists: Path | None, all_types: bool) -> None:
    """The main job: trained specialists and the base in one mixed batch, plus adapters='auto'."""
    from .demo import run_demo, run_types_demo

    sys.exit(run_types_demo(base, max_new_tokens) if all_types else run_demo(base, max_new_tokens, specialists))


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--token", default=None, help="Hub token (default: $HF_TOKEN or the stored login).")
@click.option("--endpoint", default=None, help="Hub or registry URL (default: $HF_ENDPOINT, else huggingface.co).")
@click.option(
    "--revision", "--branch", "revision", default=None, help="Branch to push to (created if missing; default main)."
)
@click.option("--message", "-m", default=None, help="Commit message.")
def push(
    folder: Path,
    repo_id: str,
    private: bool,
    token: str | None,
    endpoint: str | None,
    revision: str | None,
    message: str | None,
) -> None:
    """Push the adapter saved in FOLDER to REPO_ID (org/name), with a model card. Needs no base."""
    from .errors import AdapterZooError
    from .hub import push_adapter_folder

    try:
        info = push_adapter_folder(
            folder,
            repo_id,
            private=private or None,
            token=token,
            endpoint=endpoint,
            revision=revision,
            commit_message=message,
        )
    except AdapterZooError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"pushed {folder} to {repo_id} ({revision or 'main'}): commit {info.oid} {info.commit_url}")


@cli.command()
@click.argument("repo_id")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--revision", default=None, help="Branch or commit id (default main).")
@click.option("--token", default=None, help="Hub token (default: $HF_TOKEN or the stored login).")
@click.option("--endpoint", default=None, help="Hub or registry URL (default: $HF_ENDPOINT, else huggingface.co).")
def pull(repo_id: str, out_dir: Path, revision: str | None, token: str | None, endpoint: str | None) -> None:
    """Download the adapter REPO_ID (org/name) into OUT_DIR, checked, without loading a base."""
    from .errors import AdapterZooError
    from .hub import pull_adapter

    try:
        out = pull_adapter(repo_id, out_dir, revision=revision, token=token, endpoint=endpoint)
    except AdapterZooError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"pulled {repo_id} ({revision or 'main'}) into {out}")


@cli.command()
@click.argument("base")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--adapters",
    "adapters_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of saved adapters (one sub-folder each, named as the adapter); also where registry pulls go.",
)
@click.option(
    "--keys",
    "keys_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="YAML/JSON keys file: API keys -> tenants, owned and public adapters, limits (default: open server).",
)
@click.option(
    "--name", "base_name", default=None, help="Model id of the base in the API (default: BASE's folder name)."
)
@click.option("--slots", default=16, show_default=True, help="Device slots per adapter pool.")
@click.option("--max-batch", default=32, show_default=True, help="Requests decoded together at most.")
@click.option("--max-queue", default=256, show_default=True, help="Waiting requests at most (then 429).")
@click.option(
    "--max-host", default=None, type=int, help="Adapters kept in host memory at most (then LRU ones go to disk)."
)
@click.option(
    "--max-tokens", "default_max_tokens", default=16, show_default=True, help="Default max_tokens of /v1/completions."
)
@click.option(
    "--registry", "registry_endpoint", default=None, help="Registry (Hub API) URL to pull missing adapters from."
)
@click.option("--registry-token", default=None, envvar="ADAPTERZOO_REGISTRY_TOKEN", help="Token for the registry.")
@click.option(
    "--registry-namespace", default=None, help="Look up unknown adapter NAME as NAMESPACE/NAME in the registry."
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]), help="Base dtype.")
@click.option(
    "--drain-timeout", default=30.0, show_default=True, help="Seconds to finish running requests on shutdown."
)
@click.option(
    "--open",
    "open_access",
    is_flag=True,
    help="Without --keys, allow binding beyond loopback (anyone reaching it may use the admin routes).",
)
@click.option("--max-body-bytes", default=4 * 2**20, show_default=True, type=int, help="Request body limit (then 413).")
@click.option(
    "--max-prompt-chars",
    default=None,
    type=int,
    help="Prompt characters at most, checked before tokenizing (default: 32 x the context length).",
)
@click.option(
    "--body-timeout",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds for a whole request body to arrive (then 408): a client dribbling bytes is cut off.",
)
@click.option(
    "--stuck-after",
    default=60.0,
    show_default=True,
    type=float,
    help="Seconds without progress before the watchdog calls a request stuck (/health turns 503).",
)
@click.option(
    "--prefix-cache-mb",
    default=256,
    show_default=True,
    type=int,
    help="MiB of prompt openings' keys and values kept for later requests that start the same way "
    "(per tenant and adapter; 0: off).",
)
@click.option("--ray", is_flag=True, help="Deploy on Ray Serve (pip install 'adapterzoo[ray]').")
@click.option("--replicas", default=1, show_default=True, help="Ray Serve replicas (with --ray).")
@click.option(
    "--models-per-replica",
    default=64,
    show_default=True,
    type=int,
    envvar="ADAPTERZOO_RAY_MODELS_PER_REPLICA",
    help="Adapters Serve keeps warm per replica (with --ray).",
)
@click.option("--log-level", default="warning", show_default=True)
def serve(**options) -> None:
    """Serve BASE and its adapters over an OpenAI-compatible HTTP API (see docs/serving.md)."""
    from .errors import InvalidConfigError
    from .serve.command import run_serve
    from .serve.config import ServeConfig

    try:  # every flag checked before the base loads
        config = ServeConfig(**options)
    except InvalidConfigError as exc:
        raise click.ClickException(str(exc)) from None
    run_serve(config)


from .training.cli import eval_command, library_command, tasks_command, train_command  # noqa: E402

cli.add_command(train_command)
cli.add_command(library_command)
cli.add_command(eval_command)
cli.add_command(tasks_command)


def main() -> None:
    # OpenMP reads its wait policy once, when torch loads (plugins load it just below). Its default
    # spins at every barrier, which on a CPU shared with other processes turns each parallel region
    # into a wait for a preempted thread: a decode step with 2 threads beside one busy process took
    # 3.5 s spinning, 0.23 s with PASSIVE (docs/serving.md, "On the CPU"). The command owns its
    # process, so it sets it here; `import adapterzoo` leaves the environment alone. Set
    # OMP_WAIT_POLICY yourself to keep another policy.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    plugins.load_plugins()
    plugins.pm.hook.register_commands(cli=cli)
    cli()


if __name__ == "__main__":
    main()
