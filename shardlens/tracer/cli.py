"""The `shardlens` command line."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from collections.abc import Iterator, Sequence


def _demo(args: argparse.Namespace) -> int:
    from shardlens.tracer import demo

    print(f"shardlens demo: the induction heads of the shipped 2-layer model, {args.stages} stages, backend {args.backend}")
    summary = demo.run(Path(args.out), backend=args.backend, stages=args.stages)
    top, atp = summary["top_head"], summary["atp_top_head"]
    print(f"\nlogit diff: clean {summary['clean_logit_diff']:.2f}, corrupted {summary['corrupt_logit_diff']:.2f}")
    print(f"strongest induction head: layer {top['layer']} head {top['head']} (patching it back at the last position recovers {top['recovered']:.0%} of the logit diff)")
    print(f"attribution patching points at layer {atp['layer']} head {atp['head']}")
    for name, path in summary["outputs"].items():
        print(f"  {name:<12} {path}")
    return 0


def _hooks(args: argparse.Namespace) -> int:
    import torch

    from shardlens.hooks.model import HookedModel
    from shardlens.hooks.sources import model_config
    from shardlens.sharding.plan import meta_model

    config = model_config(args.model)  # a missing folder or bad hub id: says which, and what a source looks like
    model = HookedModel(meta_model(config, torch.float32))  # the structure only: no weights are read
    for name in model.hook_names():
        print(name)
    return 0


def _families(args: argparse.Namespace) -> int:
    from shardlens.hooks.architectures import ARCHITECTURES, decoder_model_types

    known = decoder_model_types()
    covered = [t for t in known if t in ARCHITECTURES]
    print(f"{len(covered)} of the {len(known)} decoder-only causal LM types transformers knows have canonical hook names and shard:")
    print("  " + " ".join(covered))
    if args.all:
        print("the others get module: points on every submodule (HookedModel only):")
        print("  " + " ".join(t for t in known if t not in ARCHITECTURES))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from shardlens.sharding import ShardPlan

    if Path(args.model).suffix in (".yaml", ".yml") and Path(args.model).is_file():
        from shardlens.tracer.campaign.cost import campaign_cost

        given = [flag for flag, value in (("--stages", args.stages), ("--max-memory", args.max_memory), ("--dtype", args.dtype),
                                          ("--stage-resources", args.stage_resources)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to a campaign file: its cluster and model sections say them")
        campaign_cost(args.model).describe()  # its cluster section says the stages, replicas and max_memory
        return 0
    resources = None
    if args.stage_resources is not None:
        import json

        try:
            resources = json.loads(args.stage_resources)
        except json.JSONDecodeError as error:
            raise ValueError(f"--stage-resources must be JSON, e.g. '[{{\"node_a\": 1}}, {{\"node_b\": 1}}]': {error}") from None
    plan = ShardPlan.for_model(
        args.model, stages=args.stages or 1, max_memory=parse_max_memory(args.max_memory), dtype=args.dtype, stage_resources=resources,
    )
    plan.describe()
    if args.json:
        print(plan.to_json())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    import pyarrow.parquet as pq

    from shardlens.tables.dtypes import field_dtype
    from shardlens.tables.sparse import SPARSE_SHAPE_KEY
    from shardlens.tables.parquet import DATASET, dataset

    data = dataset(args.dataset)  # refuses what is no dataset, saying what it expected and found
    files = list(data.files)
    if not files:
        raise ValueError(f"{args.dataset}: not a shardlens dataset: expected {DATASET}; found no Parquet parts in it")
    by_hook: dict = {}
    for fragment in data.get_fragments():
        import pyarrow.dataset as ds

        hook = ds.get_partition_keys(fragment.partition_expression).get("hook", "?")
        by_hook.setdefault(hook, []).append(fragment)
    first_schema = pq.read_schema(files[0], filesystem=data.filesystem)
    metadata = json.loads((first_schema.metadata or {}).get(b"shardlens", b"{}"))
    print(f"{args.dataset}: {len(by_hook)} hook points, {len(files)} parts")
    for key, value in metadata.items():
        print(f"  {key}: {value}")
    for hook, fragments in sorted(by_hook.items()):
        rows = sum(f.count_rows() for f in fragments)
        schema = fragments[0].physical_schema
        layout = "token" if "pos" in schema.names else "example"
        if "value" in schema.names:
            value = schema.field("value")
            shape, dtype = f"shape {value.type.shape}", field_dtype(value) or str(value.type.value_type)
        else:  # a sparse entry: indices and values lists, its dense row shape in the metadata
            values = schema.field("values")
            shape = f"sparse, shape {json.loads(schema.field('indices').metadata[SPARSE_SHAPE_KEY])}"
            dtype = field_dtype(values) or str(values.type.value_type)
        print(f"  {hook:<40} {rows:>8} rows  {shape}  {dtype}  layout {layout}")
    return 0


def _view(args: argparse.Namespace) -> int:
    from shardlens.tracer.campaign.view import dataset_view

    dataset = Path(args.dataset).resolve()  # "." has no name to put the page beside
    out = Path(args.out).resolve() if args.out else dataset.parent / f"{dataset.name}.view.html"
    if out.is_relative_to(dataset):
        raise ValueError(f"--out {args.out}: the page would land inside the dataset, where readers take it for a part; write it elsewhere")
    view = dataset_view(dataset, tokenizer=args.tokenizer, example=args.example)
    print(view.save(out))
    return 0


def parse_max_memory(text: str | None) -> dict | None:
    """"0=40GiB,1=40GiB,cpu=64GiB" -> {0: "40GiB", 1: "40GiB", "cpu": "64GiB"}."""
    if not text:
        return None
    budgets = {}
    for item in text.split(","):
        device, sep, size = item.partition("=")
        if not sep or not size:
            raise ValueError(f"--max-memory takes DEVICE=SIZE pairs like 0=40GiB,cpu=64GiB; got {item!r}")
        budgets[int(device) if device.isdigit() else device] = size
    return budgets


def _run(args: argparse.Namespace) -> int:
    from shardlens.tracer.campaign import run_campaign

    summary = run_campaign(args.campaign, progress=args.progress != "quiet")  # --quiet after run or before it
    print(f"{summary['name']}: {summary['units']} units ({summary['units_run_now']} run now) in {summary['seconds']} s")
    for name, info in summary["experiments"].items():
        print(f"  {name}: {info['kind']}" + (f", top {info['top']}" if "top" in info else f", {len(info['hooks'])} hook points"))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from shardlens.tracer.campaign import load_campaign, verify

    campaign = load_campaign(args.campaign)
    given = {key: value for key, value in (("examples", args.examples), ("tolerance", args.tolerance)) if value is not None}
    result = verify(campaign, **{**(campaign.verify or {}), **given})  # the options given here, then the file's verify key
    print(result.describe())
    result.check()  # VerificationError: a non-zero exit naming where they differ
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from shardlens.tracer.campaign import load_campaign, status

    path = Path(args.results)
    if path.is_file():  # a campaign file: its output folder
        path = load_campaign(path).output_path
    result = status(path)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.describe())
    return 0


def _submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    from shardlens.tracer.campaign import load_campaign

    campaign = load_campaign(args.campaign)  # refuse a bad file before anything is sent
    import time

    client = JobSubmissionClient(args.address)
    deadline = time.monotonic() + 60
    while True:  # a head that has just started may not have its job agent yet
        try:
            job = client.submit_job(
                entrypoint=f"shardlens run {Path(args.campaign).name}",
                runtime_env={"working_dir": str(Path(args.campaign).resolve().parent)},
                submission_id=args.job_id,
            )
            break
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"submitted {campaign.name} as Ray job {job} to {args.address}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from shardlens.tracer.schedule import render, write

    files = render(
        args.campaign, cron=args.cron, target=args.target, gpu_workers=args.gpu_workers,
        gpus_per_worker=args.gpus_per_worker, workdir=args.workdir,
    )
    for path in write(files, Path(args.out)):
        print(path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from shardlens.serve.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as error:
        if args.debug:
            raise
        print(f"shardlens serve: error: {error}", file=sys.stderr)
        return 2
    from shardlens.serve.app import serve_forever

    return serve_forever(config, host=args.host or config.host, port=config.port if args.port is None else args.port)


def _token(args: argparse.Namespace) -> int:
    import json

    from shardlens.serve.config import hash_token, new_token

    token = new_token()
    print(f"token: {token}   (give this to {args.name}; it is not stored anywhere)")
    print(f"config: - {{name: {json.dumps(args.name)}, sha256: {hash_token(token)}}}")  # quoted: YAML reads a plain no, 1 or null as no string
    return 0


def _add_service_commands(commands: argparse._SubParsersAction) -> None:
    """The commands of the tracing service: serve, token."""
    serve = commands.add_parser(
        "serve", help="start the tracing service: host the config's models over HTTP",
        description="Start the tracing service: host the config's models (Tracers on Ray Serve) over HTTP for clients "
        "with a bearer token the config lists. The config is checked first; a bad one exits with status 2, naming "
        "the line and the key.",
    )
    serve.add_argument("config", help="the service config YAML file")
    serve.add_argument("--host", default=None, help="address to listen on (default: the config's host)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (default: the config's port)")
    serve.set_defaults(run=_serve)

    token = commands.add_parser(
        "token", help="make a bearer token for the tracing service",
        description="Make a new random bearer token for NAME and print two lines: `token: <token>`, to give to NAME "
        "(it is not stored anywhere), and `config: - {name: \"NAME\", sha256: <hash>}`, whose part after `config: ` goes "
        "in the service config's tokens list (the config keeps only the token's SHA-256).",
    )
    token.add_argument("name", help="who the token is for (named in the service's error messages; never the token)")
    token.set_defaults(run=_token)


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    """The commands that look at a model or a dataset without running a campaign: hooks,
    families, plan, inspect, view."""
    hooks = commands.add_parser("hooks", help="list a model's hook points", description="List the hook points of a checkpoint's model (from its config; no weights are read).")
    hooks.add_argument("model", help="checkpoint folder or hub id")
    hooks.set_defaults(run=_hooks)

    families = commands.add_parser(
        "families", help="list the model families with canonical hook names",
        description="List the model types of the installed transformers that are decoder-only causal LMs, and which of "
        "them shardlens covers (canonical hook names, attention internals, sharding, the Tracer).",
    )
    families.add_argument("--all", action="store_true", help="also list the types it does not cover")
    families.set_defaults(run=_families)

    plan = commands.add_parser(
        "plan", help="print a shard plan, or what a campaign will cost",
        description="Plan a model's stages from its config alone (no weights are loaded) and print the table. Given a campaign "
        "file (.yaml), print what it will cost instead, from its cluster section, data and the model's config: per stage the "
        "weights, activations and working set per microbatch, peak memory against max_memory, bytes sent between stages and "
        "written; per experiment its forward-equivalents and bytes written (the other options do not apply).",
    )
    plan.add_argument("model", help="checkpoint folder or hub id, or a campaign file")
    plan.add_argument("--stages", type=int, default=None, help="number of stages (default: 1)")
    plan.add_argument("--max-memory", help="each stage's device budgets, e.g. 0=40GiB,1=40GiB")
    plan.add_argument("--dtype", default=None, help="parameter dtype: float32, bfloat16, float16 (default: the one the checkpoint's config names)")
    plan.add_argument("--stage-resources", help='per stage, the custom Ray resources its workers need, as JSON: \'[{"node_a": 1}, {"node_b": 1}]\'')
    plan.add_argument("--json", action="store_true", help="also print the plan as JSON")
    plan.set_defaults(run=_plan)

    inspect = commands.add_parser("inspect", help="describe a Parquet dataset of activations", description="List a dataset's hook points with rows, value shapes, dtypes and layout, and its metadata.")
    inspect.add_argument("dataset", help="dataset folder or URI")
    inspect.set_defaults(run=_inspect)

    view = commands.add_parser(
        "view", help="write an HTML view of a dataset (grid, top contexts or attention) and print its path",
        description="Write a self-contained HTML page (no network needed to open it) of what a dataset folder holds, and "
        "print its path: a sweep / atp / ig experiment's grid as a heatmap (a sweep as its patching effect, the mean over "
        "batches), a top_contexts experiment's contexts per feature with each activating token's value, or the attention "
        "patterns per layer and head of one example of a cache dataset (cache.to_parquet with hook_pattern entries). "
        "Hover a cell for its value. The page goes next to the dataset, DATASET.view.html, unless --out says where "
        "(never inside it: dataset readers would take it for a part).",
    )
    view.add_argument("dataset", help="a campaign experiment's folder (output.path/<experiment>) or a cache dataset folder")
    view.add_argument("--out", default=None, help="the HTML file to write (default: DATASET.view.html beside the folder)")
    view.add_argument("--tokenizer", default=None,
                      help="top contexts: a checkpoint whose tokenizer shows the tokens (default: the campaign's model when it "
                      "is a local folder, else token ids)")
    view.add_argument("--example", type=int, default=0, help="cache datasets: the example to show (default: 0)")
    view.set_defaults(run=_view)


def _add_campaign_checks(commands: argparse._SubParsersAction) -> None:
    """The commands that check a campaign without running its units: verify, status."""
    verify = commands.add_parser(
        "verify", help="check a campaign's cluster against one process",
        description="Run a campaign's first examples on its configured cluster and on the same checkpoint in one "
        "process, and print the largest difference per hook point its experiments name (activations; gradients of "
        "the metric for atp and ig), for the logits and for the metric. A value passes when max |cluster - one "
        "process| <= tolerance x max(1, max |one process|). Exit status 1, naming where they differ, when one does "
        "not. The campaign key `verify:` runs the same check before a campaign's first unit.",
    )
    verify.add_argument("campaign", help="the campaign YAML file")
    verify.add_argument("--examples", type=int, default=None, help="rows of the data to run (default: the file's verify.examples, else 4)")
    verify.add_argument("--tolerance", type=float, default=None,
                        help="allowed difference (default: the file's verify.tolerance, else by dtype: float32 1e-4, float16 1e-2, bfloat16 3e-2)")
    verify.set_defaults(run=_verify)

    status = commands.add_parser(
        "status", help="show a campaign's progress from its output folder",
        description="Read a running or finished campaign's output folder alone (campaign.json, events.jsonl and the "
        "units' parts and markers) and print, per experiment, the units done and left, the rate, the time left, and "
        "the units that failed with their errors. Works from any machine that sees the folder.",
    )
    status.add_argument("results", help="the campaign's output folder (output.path), or its campaign YAML file")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(run=_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardlens",
        description="Trace transformer models across processes, GPUs and nodes with TransformerLens' hook API. "
        "Progress (campaign units, loading a model's stages, writing datasets) shows as bars on stderr; --quiet "
        "hides it, --json writes it as JSON lines on stderr for schedulers and log collectors.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--quiet", dest="progress", action="store_const", const="quiet", default=None,
                       help="no progress bars (campaign units, loading stages, writing datasets)")
    shown.add_argument("--json", dest="progress", action="store_const", const="json",
                       help="progress as JSON lines on stderr instead of bars, one per event (start, progress, end; "
                       "an error as {\"event\": \"error\"}, any other line a library prints there as {\"event\": \"log\"}); "
                       "stdout keeps the command's own output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="find the induction heads of the shipped model across 2 stages (no downloads)",
        description="Run the shipped 2-layer induction model as a multi-stage Tracer (a local Ray "
        "instance by default), sweep head-level activation patching and attribution patching on "
        "an induction task, and write the results (Parquet), the residual stream (a Parquet "
        "dataset), and a heatmap as a PNG and as an HTML page.",
    )
    demo.add_argument("--out", default="shardlens-demo", help="output folder (default: ./shardlens-demo)")
    demo.add_argument("--backend", choices=["ray", "local"], default="ray", help="where the stages run (default: ray)")
    demo.add_argument("--stages", type=int, default=2, choices=[1, 2], help="stages (default: 2)")
    demo.set_defaults(run=_demo)

    _add_model_commands(commands)

    run = commands.add_parser("run", help="run (or resume) a campaign file", description="Run a campaign file's experiments as work units with a progress bar; finished units are skipped, so a rerun resumes. Writes the dataset, summary.json, summary.md, summary.html (a report to open in a browser) and plots.")
    run.add_argument("campaign", help="the campaign YAML file")
    run.add_argument("--quiet", dest="progress", action="store_const", const="quiet", default=argparse.SUPPRESS,
                     help="no progress bars, and no verify table (as shardlens --quiet run)")
    run.set_defaults(run=_run)
    _add_campaign_checks(commands)

    submit = commands.add_parser("submit", help="submit a campaign to a Ray cluster as a job", description="Send the campaign's folder to a Ray cluster (Ray Jobs) and run `shardlens run` there.")
    submit.add_argument("campaign", help="the campaign YAML file")
    submit.add_argument("--address", required=True, help="the Ray dashboard address, e.g. http://head:8265")
    submit.add_argument("--job-id", default=None, help="a submission id (default: Ray picks one)")
    submit.set_defaults(run=_submit)

    schedule = commands.add_parser("schedule", help="write deployment files that run a campaign on a schedule", description="Render KubeRay manifests (RayCluster, RayJob, RayCronJob), a Kubernetes CronJob that calls `shardlens submit`, or a systemd service and timer, for a campaign.")
    schedule.add_argument("campaign", help="the campaign YAML file")
    schedule.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: '0 2 * * *', 02:00 nightly)")
    schedule.add_argument("--target", choices=["kuberay", "cronjob", "systemd"], default="kuberay", help="what to write (default: kuberay)")
    schedule.add_argument("--out", default="deploy/generated", help="output folder (default: deploy/generated)")
    schedule.add_argument("--gpu-workers", type=int, default=2, help="GPU worker pods (default: 2)")
    schedule.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs per worker pod (default: 1)")
    schedule.add_argument("--workdir", default="/opt/shardlens", help="systemd: where shardlens and its campaigns live (default: /opt/shardlens)")
    schedule.set_defaults(run=_schedule)
    _add_service_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = args.progress  # "quiet" / "json" from --quiet / --json (`run --quiet` too); None: as configured (bars)
    try:
        with _progress(mode):
            return args.run(args)
    except Exception as error:
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if mode == "json":  # stderr stays one JSON object per line
            import json

            print(json.dumps({"event": "error", "command": args.command, "message": message}), file=sys.stderr)
        else:
            print(f"shardlens {args.command}: error: {message}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _progress(mode: str | None) -> Iterator[None]:
    """Report progress in `mode` for one command ("quiet", "json"; None: as configured), with
    transformers' and the hub's own bars off, and in "json" any other line written to stderr
    (a library's log or warning) as a JSON event too; afterwards, everything as it was (a
    notebook or a test session that called main() keeps its settings)."""
    if mode is None:
        yield
        return
    import shardlens.progress

    stderr = sys.stderr
    with contextlib.ExitStack() as stack:
        stack.enter_context(_hugging_face_bars_off())
        if mode == "json":
            stack.enter_context(_stderr_as_json_lines())
        stack.enter_context(shardlens.progress.using(mode, stream=stderr))
        yield


@contextlib.contextmanager
def _hugging_face_bars_off() -> Iterator[None]:
    """transformers' and the hub's own tqdm bars (loading, downloads) off, then as they were."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging

    hub_bars, transformers_bars = not hub.are_progress_bars_disabled(), logging.is_progress_bar_enabled()
    hub.disable_progress_bars()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_bars:
            hub.enable_progress_bars()
        if transformers_bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def _stderr_as_json_lines() -> Iterator[None]:
    """sys.stderr, and the stream of every logging handler that writes to it (transformers'
    and Ray's keep the stderr of when they were made), as a JsonLines stream; then as they were."""
    import logging

    import shardlens.progress

    stderr = sys.stderr
    lines = shardlens.progress.JsonLines(stderr)
    loggers = [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    handlers = [h for l in loggers for h in l.handlers  # (a handler whose stream is a property already writes to sys.stderr)
                if isinstance(h, logging.StreamHandler) and not isinstance(getattr(type(h), "stream", None), property) and h.stream is stderr]
    sys.stderr = lines
    for handler in handlers:
        handler.setStream(lines)
    try:
        yield
    finally:
        for handler in handlers:
            if handler.stream is lines:
                handler.setStream(stderr)
        if sys.stderr is lines:
            sys.stderr = stderr
        lines.close()


if __name__ == "__main__":
    sys.exit(main())
