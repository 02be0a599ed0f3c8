"""The damage one poisoning peer does, with and without the coordinator's loss scoring (lte/score.py).

    .venv/bin/python benchmarks/adversaries.py [--rounds 20] [--kinds signflip labels freerider zero] [--out DIR]

Real runs on this machine: the coordinator, 3 honest peers and one peer of tests/adversary.py with a fixed kind
(honest itself in the `honest` rows), the test model of tests/netproc.py (SMALL_SPEC) on digits, each for the same
number of merged rounds, every run with the same peer identities (so the same head seeds). `before` runs the
coordinator with `--score-size 0` (the format and norm checks only, as before scoring existed), `after` with the
default scoring set. Prints a markdown table: the coordinator's final test accuracy, how often the adversary was
rejected in the rounds it joined, and how often honest peers were. One run takes 2-3 minutes on 2 loaded cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import poisoning  # noqa: E402
from tests.adversary import POISON  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--kinds", nargs="+", default=["signflip", "labels", "freerider", "zero"], choices=sorted(POISON))
    ap.add_argument("--out", type=Path, help="keep logs and results.json here (default: a temp dir)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lte-adversaries-"))
    out.mkdir(parents=True, exist_ok=True)
    done = out / "results.json"  # a run interrupted and restarted with the same --out keeps what it measured
    results: dict[str, dict] = json.loads(done.read_text()) if done.is_file() else {}
    for kind in ["honest", *args.kinds]:
        for mode, size in (("before", 0), ("after", None)):
            name = f"{kind}-{mode}"
            if name in results:
                continue
            print(f"{name}: {args.rounds} rounds ...", flush=True)
            r = poisoning.run(out / name, out / "ids", [] if kind == "honest" else [kind], args.rounds, score_size=size)
            adv = r.adversary_rounds()
            h_rej, h_all = r.honest_rejections()
            results[name] = {"final_accuracy": r.final_accuracy, "adversary_rejected": sum(v is not None for v in adv.values()),
                             "adversary_rounds": len(adv), "reasons": sorted({v for v in adv.values() if v}),
                             "honest_rejected": h_rej, "honest_rounds": h_all, "mismatches": r.mismatches,
                             "wall_s": r.wall_s}
            print(f"  {json.dumps(results[name])}", flush=True)
            done.write_text(json.dumps(results, indent=1))
    ref = {mode: results[f"honest-{mode}"]["final_accuracy"] for mode in ("before", "after")}
    print(f"\n{args.rounds} merged rounds, 3 honest peers + 1 adversary (honest: 4 honest peers); accuracy on the "
          f"397-image test split\n")
    print("| adversary | before: final acc. | before: adversary rejected | after: final acc. | "
          "after: adversary rejected | after: honest rejected |")
    print("|---|---|---|---|---|---|")
    for kind in ["honest", *args.kinds]:
        cells = []
        for mode in ("before", "after"):
            res = results[f"{kind}-{mode}"]
            delta = "" if kind == "honest" else f" ({100 * (res['final_accuracy'] - ref[mode]):+.1f})"
            cells.append(f"{res['final_accuracy']:.3f}{delta}")
            if kind != "honest":
                cells.append(f"{res['adversary_rejected']}/{res['adversary_rounds']} "
                             f"({', '.join(res['reasons']) or '-'})")
            else:
                cells.append("-")
        res = results[f"{kind}-after"]
        cells.append(f"{res['honest_rejected']}/{res['honest_rounds']}")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print(f"\nlogs and results.json: {out}")


if __name__ == "__main__":
    main()
