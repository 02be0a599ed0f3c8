"""`lte-sim`: train one method on one config in a single process and report the result as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lte.cliargs import OneLineParser, device_available, int_in
from lte.config import load_spec, parse_overrides
from lte.errors import ConfigError
from lte.train import METHODS, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(prog="lte-sim", description=__doc__)
    ap.add_argument("--config", required=True, help="run spec YAML (see configs/)")
    ap.add_argument("--method", choices=METHODS, default="lte")
    ap.add_argument("--output", help="write the result JSON here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int_in(1), help="override optim.steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any spec field, e.g. --set lte.merge_every=20 (repeatable)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        if args.steps is not None:
            overrides.setdefault("optim", {})["steps"] = args.steps
        spec = load_spec(args.config, overrides)
        device_available(args.device)
        result = train(spec, args.method, device=args.device, progress=not args.no_progress)
    except ConfigError as err:
        print(f"lte-sim: error: {err}", file=sys.stderr)
        return 2
    summary = {k: result[k] for k in ("method", "test_accuracy", "test_loss", "samples_seen", "wall_time_s", "steps_per_s")}
    print(json.dumps(summary))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
