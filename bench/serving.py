"""Serving as users measure it: latency against throughput under arriving traffic, our stack and
`transformers serve --continuous-batching` on the same model, prompts and arrivals, in one run.

Each server in turn (alone on the machine) gets the same sweep through its OpenAI streaming
endpoint: at each Poisson arrival rate (`--rates`, seeded: both servers see the same arrival times
and prompts) or each number of closed-loop clients (`--concurrency`), `--requests` chat requests
drawn from bench/data/prompts.jsonl (20 to 1,900 prompt tokens, a target output length each,
greedy). Per point: requests/s and output tokens/s over the span from the first send to the last
end, TTFT, ITL (gaps between chunk arrivals, pooled) and E2E p50/p95, and goodput: the requests
that met the TTFT target of the model registry (shared/models.toml, `ttft_sla_s`) and the E2E
target of a serving profile (shared/profiles.toml, `e2e_sla_s`, `--slo-profile`). Writes
bench/results/serving.json (every request kept) and serving.png (TTFT p95 and E2E p95 against
output tokens/s, one curve per server).

    .venv/bin/python bench/serving.py [--rates 0.1,0.2,0.3,0.4,0.6] [--requests 100]
    .venv/bin/python bench/serving.py --quick          # a smoke: 2 rates, 10 requests each
    .venv/bin/python bench/serving.py --concurrency 1,4,16 --output-cap 64   # closed loop
    .venv/bin/python bench/serving.py --tenants        # a light tenant alone, then beside a flood

Ours runs as `gptoss up` does (Redis with its AOF fsynced every second, the API, the scheduler and
one worker per worker queue, `--batch-size` rows a worker decodes at once), asked with `cache:
false` so repeated prompts are generated. transformers serve computes in the worker's dtype; when
it is not installed or does not start, the output and the JSON say so.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.latency import Outcome, Slo, poisson_arrivals, summarise  # noqa: E402
from bench.stack import Cluster, cpu_flags, start_transformers_serve, wait_ready, write_results  # noqa: E402
from bench.traffic import ChatServer, Prompt, closed_loop, draw, load_prompts, open_loop, stream_chat  # noqa: E402

MODEL = "smollm2-135m"
SEED = 19
QUICK_RATES, QUICK_REQUESTS = (0.1, 0.3), 10


def slo_of(model: str, profile: str) -> Slo:
    """The TTFT target of `model` in the registry and the E2E target of serving profile `profile`."""
    from shared.profiles import profile_named
    from shared.registry import model_spec

    ttft, e2e = model_spec(model).ttft_sla_s, profile_named(profile).e2e_sla_s
    return Slo(ttft, e2e, f"ttft_sla_s of {model} (shared/models.toml), e2e_sla_s of profile {profile} "
                          "(shared/profiles.toml)")  # fmt: skip


@contextmanager
def our_server(batch_size: int) -> Iterator[ChatServer]:
    """Our stack as `gptoss up` runs it, ready; stopped on leaving."""
    env = {"GPTOSS_AUTH": "false", "GPTOSS_MODEL": MODEL, "GPTOSS_MAX_BATCH_SIZE": str(batch_size)}
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gptoss-serving-")), env, fsync="everysec")
    try:
        cluster.start_all(300)
        extra = {"cache": False, "stream_options": {"include_usage": True}}
        yield ChatServer("ours", cluster.base, MODEL, extra)
    finally:
        cluster.stop()


@contextmanager
def transformers_server(folder: Path, dtype: str) -> Iterator[ChatServer | str]:
    """`transformers serve --continuous-batching` on the prepared weights in `folder`, ready; or why
    it is not there. Stopped on leaving."""
    binary = Path(sys.executable).parent / "transformers"
    if not binary.exists():
        yield f"transformers serve is not installed ({binary} missing)"
        return
    work = Path(tempfile.mkdtemp(prefix="gptoss-serving-tf-"))
    serve, base = start_transformers_serve(folder, dtype, work)
    try:
        try:
            wait_ready(base, 240, serve, path="/health")
        except SystemExit:
            yield f"transformers serve did not start; see {work / 'serve.log'}"
            return
        yield ChatServer("transformers", base, str(folder), {})
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(30)


def warm_up(server: ChatServer, prompts: list[Prompt]) -> None:
    """Two short requests, not counted: the first loads what loads lazily."""
    for prompt in sorted(prompts, key=lambda p: p.prompt_tokens)[:2]:
        outcome = stream_chat(server, Prompt(prompt.id, prompt.messages, 8, prompt.prompt_tokens))
        if not outcome.ok:
            raise SystemExit(f"{server.name}: the warm-up request failed: {outcome.error}")


def sweep(
    server: ChatServer, data: list[Prompt], points: list[float], mode: str, requests: int, slo: Slo
) -> list[dict[str, Any]]:
    """Every point of the sweep against `server`: its summary and its requests."""
    warm_up(server, data)
    figures = []
    for i, point in enumerate(points):
        prompts = draw(data, requests, SEED)
        start = time.perf_counter()
        outcomes: list[Outcome]
        if mode == "rate":  # the same arrival times for every server
            times = poisson_arrivals(point, requests, SEED + i)
            outcomes = open_loop(lambda p: stream_chat(server, p), prompts, times)
        else:
            outcomes = closed_loop(lambda p: stream_chat(server, p), prompts, int(point))
        summary = {mode: point, **summarise(outcomes, slo)}
        show(server.name, summary, mode)
        figures.append({**summary, "samples": [o.record(start) for o in outcomes]})
    return figures


def ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def show(name: str, s: dict[str, Any], mode: str) -> None:
    print(f"{name:<13}{s[mode]:>6g}{s['requests_per_second']:>8.2f}{s['output_tokens_per_second']:>8.1f}"
          f"{ms(s['ttft_s']['p50']):>8}{ms(s['ttft_s']['p95']):>7}{ms(s['itl_s']['p50']):>7}{ms(s['itl_s']['p95']):>7}"
          f"{ms(s['e2e_s']['p50']):>8}{ms(s['e2e_s']['p95']):>7}{s['goodput_fraction']:>7.0%}"
          f"{s['goodput_requests_per_second']:>7.2f}{s['failed']:>5}", flush=True)  # fmt: skip


def header(mode: str) -> None:
    print(f"{'server':<13}{'rate' if mode == 'rate' else 'conc':>6}{'req/s':>8}{'tok/s':>8}"
          f"{'TTFT ms p50':>12}{'p95':>5}{'ITL p50':>9}{'p95':>5}{'E2E ms p50':>11}{'p95':>6}"
          f"{'good':>6}{'good/s':>8}{'fail':>5}")  # fmt: skip


def ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Per point, ours over transformers serve: TTFT p95, E2E p95 and output tokens/s."""
    rows = []
    for a, b in zip(ours, theirs, strict=True):

        def over(key: str, stat: str = "p95", a: dict[str, Any] = a, b: dict[str, Any] = b) -> float | None:
            x, y = (a[key][stat], b[key][stat]) if stat else (a[key], b[key])
            return x / y if x is not None and y else None

        rows.append({mode: a[mode], "ttft_p95": over("ttft_s"), "e2e_p95": over("e2e_s"),
                     "output_tokens_per_second": over("output_tokens_per_second", "")})  # fmt: skip
    return rows


def plot(curves: dict[str, list[dict[str, Any]]], mode: str, title: str, path: Path) -> None:
    """TTFT p95 and E2E p95 against achieved output tokens/s, one curve per server, each point
    labelled with its rate (or clients)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "ttft_s", "TTFT p95 (s)"), (axes[1], "e2e_s", "E2E p95 (s)")):
        for name, points in curves.items():
            shown = [p for p in points if p[key]["p95"] is not None]
            xs, ys = [p["output_tokens_per_second"] for p in shown], [p[key]["p95"] for p in shown]
            ax.plot(xs, ys, marker="o", label=name)
            for p, x, y in zip(shown, xs, ys, strict=True):
                ax.annotate(f"{p[mode]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("achieved output tokens/s")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_points(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@click.command()
@click.option("--rates", default="0.1,0.2,0.3,0.4,0.6", show_default=True,
              help="Poisson arrival rates (requests/s), comma-separated")  # fmt: skip
@click.option("--concurrency", default=None, help="Closed loop instead: numbers of clients, comma-separated")
@click.option("--requests", "count", default=100, show_default=True, help="Requests per rate")
@click.option("--servers", default="ours,transformers", show_default=True, help="Which servers, in order")
@click.option("--batch-size", default=16, show_default=True, help="Rows our worker decodes at once")
@click.option("--slo-profile", default="latency_first", show_default=True,
              help="Profile whose e2e_sla_s counts")  # fmt: skip
@click.option("--output-cap", type=int, default=None,
              help="Cap every prompt's target output length (slow machines); unset: the data's")  # fmt: skip
@click.option("--quick", is_flag=True, help=f"A smoke: rates {QUICK_RATES}, {QUICK_REQUESTS} requests each")
@click.option("--tenants", is_flag=True, help="Instead: a light tenant alone, then beside a flooding one")
@click.option("--light-rate", default=0.5, show_default=True, help="--tenants: light requests/s (Poisson)")
@click.option("--light-requests", default=30, show_default=True, help="--tenants: light requests per phase")
@click.option("--light-tokens", default=16, show_default=True, help="--tenants: light output tokens")
@click.option("--flood-clients", default=None, type=int, help="--tenants: flood clients; unset: 2x batch")
@click.option("--flood-tokens", default=128, show_default=True, help="--tenants: flood output tokens at most")
def main(
    rates: str,
    concurrency: str | None,
    count: int,
    servers: str,
    batch_size: int,
    slo_profile: str,
    output_cap: int | None,
    quick: bool,
    tenants: bool,
    light_rate: float,
    light_requests: int,
    light_tokens: int,
    flood_clients: int | None,
    flood_tokens: int,
) -> None:
    """Sweep each server in turn, print and write the figures, plot the curves."""
    if tenants:
        from bench.tenants import run_tenants

        clients = flood_clients or 2 * batch_size
        run_tenants(MODEL, load_prompts(), slo_of(MODEL, slo_profile), batch_size=batch_size,
                    light_rate=light_rate, light_requests=light_requests, light_tokens=light_tokens,
                    flood_clients=clients, flood_tokens=flood_tokens, seed=SEED)  # fmt: skip
        return
    chosen = [s.strip() for s in servers.split(",") if s.strip()]
    if unknown := sorted(set(chosen) - {"ours", "transformers"}):
        raise click.BadParameter(f"unknown servers {unknown}; known: ours, transformers")
    mode = "concurrency" if concurrency else "rate"
    points = parse_points(concurrency or rates)
    if quick:
        points, count = (points[:2] if concurrency else list(QUICK_RATES)), QUICK_REQUESTS
    slo, data, flags = slo_of(MODEL, slo_profile), load_prompts(), cpu_flags()
    if output_cap is not None:
        data = [replace(p, max_tokens=min(p.max_tokens, output_cap)) for p in data]
    print(f"serving: {MODEL}, {mode} {points}, {count} requests each, {len(data)} prompts; "
          f"SLO TTFT ≤ {slo.ttft_s} s, E2E ≤ {slo.e2e_s} s ({slo.source}); "
          f"cpu {os.cpu_count()} cores {flags}", flush=True)  # fmt: skip
    curves: dict[str, list[dict[str, Any]]] = {}
    unavailable: dict[str, str] = {}
    began = time.monotonic()
    header(mode)
    for name in chosen:
        if name == "ours":
            with our_server(batch_size) as server:
                curves["ours"] = sweep(server, data, points, mode, count, slo)
            continue
        from bench.throughput import model_folder, worker_dtypes

        folder = model_folder()
        dtype = str(worker_dtypes(folder, batch_size)[1]).removeprefix("torch.")
        with transformers_server(folder, dtype) as served:
            if isinstance(served, str):
                unavailable["transformers"] = served
                print(f"transformers: {served}", flush=True)
            else:
                curves["transformers"] = sweep(served, data, points, mode, count, slo)
    compared = ratios(curves["ours"], curves["transformers"], mode) if len(curves) == 2 else []
    for row in compared:
        print(f"ours / transformers at {mode} {row[mode]:g}: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in row.items() if k != mode and v is not None))  # fmt: skip
    record = {
        "benchmark": "serving", "model": MODEL, "mode": mode, "points": points, "requests": count,
        "quick": quick, "output_cap": output_cap, "batch_size": batch_size, "seed": SEED, "slo": vars(slo),
        "cpu_count": os.cpu_count(), "cpu_flags": flags, "servers": curves, "unavailable": unavailable,
        "ours_over_transformers": compared,
        "seconds": round(time.monotonic() - began, 1),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    out = write_results("serving", record)
    if curves:
        notes = "".join(f"; {n}: {why}" for n, why in unavailable.items())
        title = (f"{MODEL}, {os.cpu_count()} cores, " + ", ".join(f for f, on in flags.items() if on)
                 + f"; {count} requests per point"
                 + (f", outputs capped at {output_cap} tokens" if output_cap else "") + notes)  # fmt: skip
        plot(curves, mode, title, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
