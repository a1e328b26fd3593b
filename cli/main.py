"""The `gptoss` command: reads the environment once, into Settings, and starts what is asked."""

from __future__ import annotations

from typing import Any

import click

from shared.settings import Settings


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@click.group()
def cli() -> None:
    """gpt-oss inference server: API, scheduler and workers over Redis."""


@cli.command()
@click.option("--host", default=None, help="Address to bind (GPTOSS_API_HOST).")
@click.option("--port", type=int, default=None, help="Port to bind (GPTOSS_API_PORT).")
def api(host: str | None, port: int | None) -> None:
    """Run the HTTP API."""
    from api.main import main as run

    run(_settings(api_host=host, api_port=port))


@cli.command()
def scheduler() -> None:
    """Run the scheduler."""
    from scheduler.main import main as run

    run(_settings())


@cli.command()
@click.option("--queue", type=click.Choice(["gpu-single", "gpu-multi"]), default=None)
@click.option("--model", default=None, help="Registry name of the model (GPTOSS_MODEL).")
@click.option("--burst", is_flag=True, help="Quit when the queue is empty.")
def worker(queue: str | None, model: str | None, burst: bool) -> None:
    """Run a worker that keeps its model loaded."""
    from workers.main import main as run

    run(_settings(worker_queue=queue, model=model), burst=burst)


@cli.command()
@click.option("--model", default=None, help="Registry name or alias of the model to serve (GPTOSS_MODEL).")
@click.option("--profile", default=None, help="Serving profile, e.g. latency_first (GPTOSS_PROFILE).")
@click.option("--port", type=int, default=None, help="API port (GPTOSS_API_PORT).")
def up(model: str | None, profile: str | None, port: int | None) -> None:
    """Start everything for one machine: Redis (unless given), API, scheduler, one worker per queue."""
    from cli.up import run_stack

    raise SystemExit(run_stack(_settings(model=model, profile=profile, api_port=port)))


@cli.command()
@click.argument("question")
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait.")
@click.option("--api-url", default=None, help="API to call (GPTOSS_API_URL).")
def submit(
    question: str, max_tokens: int | None, temperature: float, timeout: float, api_url: str | None
) -> None:
    """Submit a chat question as a job, wait for it, print the answer."""
    from cli.submit import submit_and_wait

    raise SystemExit(submit_and_wait(_settings(api_url=api_url), question, max_tokens, temperature, timeout))


@cli.group()
def model() -> None:
    """Manage model weights in the cache."""


@model.command("prepare")
@click.argument("name", required=False)
def model_prepare(name: str | None) -> None:
    """Convert or build a registry model into the cache (default: the served model)."""
    from shared.logging import configure_logging
    from shared.registry import model_spec
    from workers.model_store import prepare

    settings = _settings(model=name)
    configure_logging(settings, "prepare")
    folder = prepare(
        model_spec(settings.model),
        settings.cache_dir,
        vocab_dir=settings.vocab_dir(),
        local_path=settings.model_path,
    )
    click.echo(str(folder))


@cli.command()
def vocab() -> None:
    """Provision harmony's o200k vocabulary offline (from npm's js-tiktoken, SHA-256 checked)."""
    from shared.vocab import provision

    click.echo(str(provision(_settings().vocab_dir())))


@model.command("list")
def model_list() -> None:
    """List the registry."""
    from shared.registry import load_registry

    for spec in load_registry().values():
        click.echo(
            f"{spec.name}\t{spec.source}\t{spec.dtype}\tcontext={spec.context_length}\t{spec.chat_format}"
        )


@cli.group("keys")
def keys_group() -> None:
    """Manage API keys (stored hashed in Redis, each bound to a tenant)."""


def _tenant_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The --tenant value if it is a valid tenant name, else a usage error naming the rule."""
    from shared.apikeys import check_tenant
    from shared.errors import InvalidTenant

    try:
        return check_tenant(value)
    except InvalidTenant as exc:
        raise click.BadParameter(exc.message) from None


@keys_group.command("create")
@click.option(
    "--tenant",
    required=True,
    callback=_tenant_name,
    help="Tenant the key acts for: 1 to 64 letters, digits, `_`, `.` or `-`.",
)
@click.option("--admin", is_flag=True, help="Admin role: /admin/*, the debug bundle, rq-dashboard.")
@click.option("--name", default="", help="A note to recognise the key by.")
def keys_create(tenant: str, admin: bool, name: str) -> None:
    """Create a key and print it (it is shown only once)."""
    from shared.apikeys import create_key
    from shared.connection import connect

    settings = _settings()
    key, record = create_key(
        connect(settings.redis_url_or_default()), tenant, "admin" if admin else "user", name
    )
    click.echo(key)
    click.echo(f"id {record.id}, tenant {record.tenant}, role {record.role}", err=True)


@keys_group.command("list")
def keys_list() -> None:
    """List keys (ids, tenants, roles; never the keys themselves)."""
    from shared.apikeys import list_keys
    from shared.connection import connect

    for record in list_keys(connect(_settings().redis_url_or_default())):
        state = "revoked" if record.revoked_at else "active"
        click.echo(f"{record.id}\t{record.tenant}\t{record.role}\t{state}\t{record.name}")


@keys_group.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id; it stops working at once."""
    from shared.apikeys import revoke
    from shared.connection import connect

    if revoke(connect(_settings().redis_url_or_default()), key_id) is None:
        raise click.ClickException(f"no key with id {key_id}")
    click.echo(f"revoked {key_id}")


def main() -> None:
    """Console-script entry."""
    cli()
