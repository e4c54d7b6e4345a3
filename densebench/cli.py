"""The `densebench` command line (typer + rich).

User errors (DenseBenchError) print one message with its fix and exit with code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .cli_help import install as use_conventional_metavars
from .errors import ConfigError, DenseBenchError, choices_message

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="densebench: how good are this encoder's patch features?")
list_app = typer.Typer(help="List models and benchmarks.", no_args_is_help=True)
data_app = typer.Typer(help="Check or prepare dataset folders.", no_args_is_help=True)
app.add_typer(list_app, name="list")
app.add_typer(data_app, name="data")
use_conventional_metavars(app)  # help shows --seed N, --out DIR, ... (not <int>, <path>)
out = Console()
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"densebench {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main_options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")) -> None:
    """densebench: how good are this encoder's patch features?"""


def parse_extra_options(args: list[str]) -> dict[str, str]:
    """`--memory-size all --neighbours=10 --flag` -> {"memory_size": "all", "neighbours": "10", "flag": "true"}."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ConfigError(f"unexpected argument {tok!r}", hint="protocol options are written --name value")
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            elif name.startswith("no-"):
                name, value = name[3:], "false"
            else:
                value = "true"
        opts[name.replace("-", "_")] = value
        i += 1
    return opts


def _metric_cell(result: dict, key: str) -> str:
    v = result["metrics"].get(key)
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def _print_results(rows: list[tuple[str, dict, Path | None]]) -> None:
    from .benchmark_table import get_benchmark

    from .tables import Col, emit

    table = []
    for model, result, path in rows:
        key = get_benchmark(result["benchmark"]).main_metric
        table.append({"model": model, "benchmark": result["benchmark"], "metric": key,
                      "value": _metric_cell(result, key),
                      "forwards": result["provenance"].get("cache", {}).get("images_forwarded", "-"),
                      "time_s": f"{result['provenance']['timings']['total_s']:.1f}", "file": path})
    emit(out, table, [Col("model", role="key"), Col("benchmark", role="key"), Col("metric", role="key"),
                      Col("value", role="number"), Col("forwards", role="secondary"),
                      Col("time_s", "time (s)", "secondary"), Col("file", role="secondary")],
         "table", title="densebench results")
    folders = sorted({str(Path(p).parent) for _, _, p in rows if p})
    if len(folders) > 3:
        folders = [os.path.commonpath(folders)]
    if folders:
        out.print("results written to " + ", ".join(f"[bold]{escape(f)}/[/]" for f in folders))


def _print_comparison(results: list[dict]) -> None:
    """Benchmarks x models table of the headline metric, best per row in bold."""
    from .benchmark_table import get_benchmark

    models = list(dict.fromkeys(r["model"]["name"] for r in results))
    benches = list(dict.fromkeys(r["benchmark"] for r in results))
    table = Table(title="embedded default: synthetic suite (numbers are not comparable to published ones)")
    table.add_column("benchmark")
    table.add_column("metric")
    for m in models:
        table.add_column(escape(m), justify="right", no_wrap=True)
    for b in benches:
        key = get_benchmark(b).main_metric
        vals = {r["model"]["name"]: r["metrics"].get(key) for r in results if r["benchmark"] == b}
        best = max((v for v in vals.values() if isinstance(v, (int, float))), default=None)
        cells = []
        for m in models:
            v = vals.get(m)
            cell = f"{v:.2f}" if isinstance(v, (int, float)) else "-"
            cells.append(f"[bold green]{cell}[/]" if v is not None and v == best and len(models) > 1 else cell)
        table.add_row(b, key, *cells)
    out.print(table)


def protocol_options_epilog() -> str:
    """The protocol options of every benchmark, from their declarations (shown by `densebench run --help`)."""
    from .benchmark_table import benchmarks

    paragraphs, seen = ["Protocol options (--name value; details: densebench list benchmarks --options):"], set()
    for b in benchmarks():
        if b.protocol_name in seen:
            continue
        seen.add(b.protocol_name)
        opts = ", ".join(f"{o.flag} ({o.accepts or o.type}; default {o.default_text})"
                         for o in b.config_class.options())
        paragraphs.append(escape(f"{b.protocol_name}: {opts}"))
    return "\n\n".join(paragraphs)


class RunCommand(typer.core.TyperCommand):
    """`run` with its epilog built from the option declarations when help is shown (not at import)."""

    @property
    def epilog(self) -> str:
        return protocol_options_epilog()

    @epilog.setter
    def epilog(self, value) -> None:  # click sets it in __init__; the declarations are the source
        pass


@app.command(cls=RunCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="Model string: a registry name "
                                        "(densebench list models), timm:<arch>, hf:<repo>, random:<arch>, pixels, "
                                        "neco:<ckpt>, or pkg.module:factory (runs that code!)."),
    weights: str | None = typer.Option(None, "--weights", help="Local weights (.pth/.ckpt/.safetensors) in "
                                          "timm, Meta DINO/DINOv2 or NeCo format; loaded strictly."),
    benchmark: str | None = typer.Option(None, "--benchmark", "-b", help="Benchmark names or groups (all, "
                                            "a protocol such as linear, a dataset such as voc), comma-separated; "
                                            "default: every benchmark whose data is under --data-root."),
    data_root: str | None = typer.Option(None, "--data-root", help="A dataset's official folder or a folder "
                                            "holding several (default $DENSEBENCH_DATA)."),
    input_size: int | None = typer.Option(None, "--input-size", help="Input side in pixels (default: the "
                                             "protocol's published size)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, recorded), cpu, cuda or cuda:N."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per forward batch."),
    seed: int | None = typer.Option(None, "--seed", help="Protocol seed (augmentations, sampling)."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Data-loading worker processes "
                                              "(default: auto, min(8, cores); recorded)."),
    layer: int | None = typer.Option(None, "--layer", help="Block whose output is used (negative from the end; "
                                        "default -1)."),
    feature_norm: str | None = typer.Option(None, "--feature-norm", help="on/off: apply the final norm "
                                               "(default: the protocol's published choice)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Result .json (one benchmark) or directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing result files."),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Feature cache (default $DENSEBENCH_CACHE "
                                            "or the user cache dir)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    precision: str = typer.Option("auto", "--precision", help="auto (fp16 on CUDA, fp32 on the CPU), fp32 (as the "
                                  "references), tf32, bf16 or fp16: forward and k-NN search; recorded."),
    verify_data: bool = typer.Option(False, "--verify-data", help="Identify the data by its contents (a hash of "
                                        "every image and mask) instead of size + mtime: reads all the data once."),
    protocol: str | None = typer.Option(None, "--protocol", help="Named protocol version: hbird-2.0 (default) or "
                                           "hbird-1.1 for the in-context benchmarks, neco-leopart for the linear "
                                           "probe; applies to the benchmarks of that protocol."),
    pos_interp: str = typer.Option("auto", "--pos-interp", help="Position-embedding resampling of timm ViTs: "
                                      "timm, meta-offset, or auto (per benchmark, what the code behind its "
                                      "published rows used)."),
    limit: int | None = typer.Option(None, "--limit", help="Smoke test on real data: only the first N images of "
                                        "every split (SPair: pairs, DAVIS: sequences); results are non-standard."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Evaluate an encoder. With no arguments: every benchmark on the built-in synthetic suite (offline, CPU).

    Protocol options are passed as --name value, e.g. --memory-size all --neighbours 30 --augment-epochs 2
    (see `densebench list benchmarks --options`).
    """
    from . import api, distributed
    from .paths import slug

    extra = parse_extra_options(list(ctx.args))
    norm = None
    if feature_norm is not None:
        if feature_norm.lower() not in ("on", "off"):
            raise ConfigError(choices_message("--feature-norm", feature_norm, ["on", "off"]))
        norm = feature_norm.lower() == "on"
    common = {"input_size": input_size, "batch_size": batch_size, "seed": seed, "num_workers": num_workers,
              "protocol": protocol, "limit": limit}
    device = api.resolve_device(device)
    with distributed.session(device) as group:   # torchrun / srun: rank 0 writes and prints
        if model is None:
            if (data_root or weights or extra or verify_data or pos_interp != "auto" or precision != "auto"
                    or any(v is not None for v in common.values())):
                raise ConfigError("--model is required when options other than --benchmark are given",
                                  hint="`densebench run` without --model runs the embedded default (built-in models "
                                       "on the synthetic suite); otherwise name the model, e.g. --model dinov2_vits14")
            rows = []
            folders, results = api.embedded_default(output or "densebench-results", cache_dir=cache_dir, device=device,
                                                    progress=not quiet, benchmark_names=benchmark,
                                                    on_result=lambda b, r, p: rows.append((r["model"]["name"], r, p)))
            if not group.is_main:
                return
            _print_results(rows)
            _print_comparison(results)
            from .benchmark_table import get_benchmark

            notes = api.reduced_settings_notes([get_benchmark(n) for n in dict.fromkeys(r.benchmark for r in results)])
            if notes:
                out.print("reduced settings of the embedded default (not the published protocols):", highlight=False)
                for line in notes:
                    out.print("  " + line, markup=False, highlight=False, soft_wrap=True)
            return
        models = [m.strip() for m in model.split(",") if m.strip()] if not Path(model).exists() else [model]
        if len(models) > 1 and weights:
            raise ConfigError("--weights applies to one model; several were given with --model",
                              hint="run each model with its own --weights")
        stamp = api.timestamp()
        opts = {**common, **extra}
        for name in models:
            # results are data, never only printed: <out>/<model>/<timestamp>/ unless -o names the place
            folder = (Path(output) / slug(name) if output is not None and len(models) > 1 else output)
            folder = folder if folder is not None else api.run_folder("densebench-results", name, stamp)
            rows = []
            results = api.evaluate(name, weights=weights, benchmarks=benchmark, data_root=data_root, device=device,
                                   cache_dir=cache_dir, use_cache=not no_cache, output=folder, overwrite=overwrite,
                                   progress=not quiet, layer=layer, feature_norm=norm, options=opts,
                                   verify_data=verify_data, pos_interp=pos_interp, precision=precision,
                                   on_result=lambda b, r, p, rows=rows, name=name: rows.append((name, r, p)))
            if not group.is_main:
                continue
            _print_results(rows)
            if limit is not None:
                out.print(f"--limit {limit}: a smoke test on the first {limit} items of each split; these results "
                          "are non-standard (recorded in their config, marked on leaderboards)", highlight=False)
            if Path(folder).suffix != ".json":
                api.write_run_summary(folder, results, device=device)


FORMAT_HELP = "table (default), json, csv, markdown or plain (tab-separated)."


@list_app.command("models")
def list_models(fmt: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
                as_json: bool = typer.Option(False, "--json", help="Same as --format json.")) -> None:
    """Named encoders, their source and whether their weights are available offline.

    Besides these names: timm:<arch>, hf:<repo>, random:<arch>, pixels, neco:<ckpt>, pkg.mod:factory.
    """
    from .encoders import list_models as _list
    from .tables import Col, emit

    columns = [Col("name", role="key"), Col("patch_size", "patch", "number"), Col("native_size", "size", "number"),
               Col("offline", role="key"), Col("arch", role="secondary"), Col("source", role="text")]
    emit(out, _list(), columns, "json" if as_json else fmt, title="models")


@list_app.command("benchmarks")
def list_benchmarks(options: bool = typer.Option(False, "--options", help="Show each protocol's options."),
                    fmt: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
                    as_json: bool = typer.Option(False, "--json", help="Every field as JSON (configs, citations).")
                    ) -> None:
    """Benchmarks with their protocol, dataset, headline metric and published defaults."""
    import dataclasses

    from .benchmark_table import benchmarks
    from .results import jsonable
    from .tables import Col, emit

    specs = benchmarks()
    if as_json:
        out.print_json(json.dumps({b.name: {
            "protocol": b.protocol_name, "dataset": b.dataset.name, "description": b.description,
            "main_metric": b.main_metric, "headline_metrics": list(b.headline_metrics),
            "citations": list(b.citations), "config": jsonable(dataclasses.asdict(b.default_config())),
            "options": [o.as_dict() for o in b.config_class.options()] if options else None}
            for b in specs}, default=str))
        return
    rows = [{"name": b.name, "protocol": b.protocol_name, "dataset": b.dataset.name, "metric": b.main_metric,
             "description": b.description} for b in specs]
    emit(out, rows, [Col("name", role="key"), Col("metric", role="key"), Col("protocol", role="secondary"),
                     Col("dataset", role="secondary"), Col("description")], fmt, title="benchmarks")
    if not options:
        return
    seen = set()
    for b in specs:
        if b.protocol_name in seen:
            continue
        seen.add(b.protocol_name)
        rows = [{"option": o.flag, "default": o.default_text, "accepts": o.accepts or o.type,
                 "meaning": o.help + (" (does not change the numbers)" if o.non_semantic else "")}
                for o in b.config_class.options()]
        emit(out, rows, [Col("option", role="key"), Col("default", role="key"), Col("accepts", role="key"),
                         Col("meaning")], fmt, title=f"{b.protocol_name} options (published defaults)")


@data_app.command("verify")
def data_verify(name: str = typer.Argument(..., help="voc, ade20k, coco-things, coco-stuff or spair"),
                root: str | None = typer.Option(None, "--root", "--data-root", help="Dataset folder or data home "
                                                   "(default $DENSEBENCH_DATA).")) -> None:
    """Check a dataset folder: layout, counts, label ranges, image/mask sizes. Exit 1 if problems are found."""
    from .data import FAMILIES
    from .data.verify import verify
    from .paths import data_home

    if name not in FAMILIES:
        raise ConfigError(choices_message("dataset", name, FAMILIES))
    base = data_home(root)
    if base is None:
        raise ConfigError("no dataset folder given", hint="pass --root DIR or set $DENSEBENCH_DATA")
    from .progress import progress_bar

    with progress_bar(f"verifying {name}", total=None) as advance:
        problems = verify(name, base, progress=lambda done, total, path: advance(1, total=total))
    if not problems:
        out.print(f"[green]{escape(name)}: no problems found under {escape(str(base))}[/]")
        return
    table = Table(title=f"{name}: {len(problems)} problem(s)")
    for col in ("path", "problem", "fix"):
        table.add_column(col, overflow="fold")
    for p in problems:
        table.add_row(str(p.path), p.message, p.fix or "")
    out.print(table)
    raise typer.Exit(1)


@data_app.command("prepare")
def data_prepare(name: str = typer.Argument(..., help="voc, ade20k, coco-things, coco-stuff or spair"),
                 root: str | None = typer.Option(None, "--root", "--data-root", help="For COCO: the COCO root (or "
                                                 "data home) whose train2017/val2017 folders define the split "
                                                 "lists.")) -> None:
    """Print the official archives (URLs, checksums) and the steps that build the expected layout.

    For coco-things / coco-stuff with --root, also write the split lists densebench reads
    (val = all of val2017, train = the fixed, seeded 10 % of train2017) into <coco root>/densebench_splits/.
    """
    from .data import FAMILIES, find_root
    from .data.verify import prepare_instructions

    if name not in FAMILIES:
        raise ConfigError(choices_message("dataset", name, FAMILIES))
    if root is None:
        out.print(prepare_instructions(name), markup=False, highlight=False, soft_wrap=True)  # URLs stay whole
        return
    if not name.startswith("coco"):
        raise ConfigError(f"--root is only used by the COCO families; {name} needs no preparation step here",
                          hint=f"run `densebench data verify {name} --root {root}` to check the folder")
    from .data.coco import write_coco_split_lists

    written = write_coco_split_lists(find_root(name, Path(root)))
    for split, path in written.items():
        n = len(path.read_text().split())
        out.print(f"wrote {split} list ({n} ids): {path}", markup=False, highlight=False)


@app.command()
def synth(out_dir: Path = typer.Option(..., "--out", help="Folder to write the synthetic suite into."),
          seed: int = typer.Option(0, "--seed", help="Generator seed.")) -> None:
    """Write the deterministic synthetic suite in the four official layouts (the embedded default's data)."""
    from .data.synth import write_synthetic_suite

    info = write_synthetic_suite(out_dir, seed=seed)
    out.print(f"synthetic suite written to [bold]{escape(str(out_dir))}[/]")
    if isinstance(info, dict):
        out.print_json(json.dumps(info, default=str))


@app.command()
def version() -> None:
    """Print the densebench version."""
    out.print(__version__)


def _register_subcommands() -> None:
    from . import cli_board, cli_cache, cli_reproduce, cli_selfcheck

    cli_board.register(app)
    cli_cache.register(app)
    cli_reproduce.register(app)
    cli_selfcheck.register(app)


_register_subcommands()


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except DenseBenchError as e:

        # User text (paths, model names) is printed as typed: no markup, no :emoji: codes, no hard wraps.
        style = {"highlight": False, "emoji": False, "soft_wrap": True}
        err.print(f"[bold red]error:[/] {escape(e.message)}", **style)
        if e.hint:
            err.print(f"[bold]fix:[/] {escape(e.hint)}", **style)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
