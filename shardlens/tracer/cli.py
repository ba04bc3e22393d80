"""The `shardlens` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Sequence


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardlens",
        description="Trace transformer models across processes, GPUs and nodes with TransformerLens' hook API.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="find the induction heads of the shipped model across 2 stages (no downloads)",
        description="Run the shipped 2-layer induction model as a multi-stage Tracer (a local Ray "
        "instance by default), sweep head-level activation patching and attribution patching on "
        "an induction task, and write the results (Parquet), the residual stream (a Parquet "
        "dataset) and a heatmap PNG.",
    )
    demo.add_argument("--out", default="shardlens-demo", help="output folder (default: ./shardlens-demo)")
    demo.add_argument("--backend", choices=["ray", "local"], default="ray", help="where the stages run (default: ray)")
    demo.add_argument("--stages", type=int, default=2, choices=[1, 2], help="stages (default: 2)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
