"""The `shardlens` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    import torch

    from shardlens.hooks.toy import ToyTransformer

    torch.manual_seed(args.seed)
    model = ToyTransformer(n_layers=args.layers).eval()
    tokens = torch.randint(0, 50, (2, 8))
    print(f"ToyTransformer: {args.layers} layers, {len(model.hook_names())} hook points")
    for name in model.hook_names():
        print(f"  {name}")
    loss, cache = model.run_with_cache(tokens, return_type="loss", names_filter="blocks.*.hook_resid_post", incl_bwd=True)
    print(f"\nrun_with_cache(tokens [2, 8], names_filter='blocks.*.hook_resid_post', incl_bwd=True)")
    print(f"loss = {loss.item():.4f}")
    print(cache)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardlens",
        description="Trace transformer models across processes, GPUs and nodes with TransformerLens' hook API.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the built-in demo (no downloads)",
        description="Build a small random ToyTransformer, list its hook points, and run it once "
        "with run_with_cache, caching the residual stream and its gradients.",
    )
    demo.add_argument("--layers", type=int, default=2, help="number of blocks (default: 2)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for weights and tokens (default: 0)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
