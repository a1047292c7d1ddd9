"""Measure gsplat (CUDA) against the pure-PyTorch rasterizer and print the numbers.

    python scripts/render_parity.py --out parity.json [--fixtures DIR]

For every scene (random ones, and the release fixtures' Gaussians when found): mean / max
absolute difference of images, alphas, depths (where both alphas > 0.5) and visible means2d,
how often both cull alike, and the cosine similarity of the gradients w.r.t. every Gaussian
field for a colour loss and a depth loss. Exits non-zero when a bound of
tokengs.rendering.parity.THRESHOLDS is violated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from tokengs.rendering.parity import THRESHOLDS, check_report, compare_backends, fixture_cases, random_cases  # noqa: E402


def default_fixtures() -> Path:
    return next((p for p in (ROOT.parent / "shared", ROOT / "shared") if p.is_dir()), ROOT / "shared") / "fixtures" / "reference"


def table(reports: list[dict]) -> str:
    fields = ("means", "opacities", "scales", "quats", "colors")
    head = ["scene", "img mean", "img max", "alpha mean", "alpha max", "depth mean", "depth max", "m2d max", "cull ="]
    head += [f"cos {f[:5]}" for f in fields] + [f"dcos {f[:5]}" for f in fields]
    rows = [head]
    for r in reports:
        cos = lambda loss, f: "-" if r["grad_cosine"][loss][f] is None else f"{r['grad_cosine'][loss][f]:.5f}"
        rows.append([r["scene"], f"{r['images']['mean_abs']:.1e}", f"{r['images']['max_abs']:.1e}",
                     f"{r['alphas']['mean_abs']:.1e}", f"{r['alphas']['max_abs']:.1e}",
                     f"{r['depths_where_alpha_gt_0.5']['mean_abs']:.1e}", f"{r['depths_where_alpha_gt_0.5']['max_abs']:.1e}",
                     f"{r['means2d_visible']['max_abs']:.1e}", f"{r['culling_agreement']:.5f}"]
                    + [cos("color", f) for f in fields] + [cos("depth", f) for f in fields])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the reports here as JSON")
    parser.add_argument("--fixtures", type=Path, default=default_fixtures(), help="the reference fixtures folder")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("render_parity: CUDA is not available; gsplat needs a GPU", file=sys.stderr)
        return 2
    cases = random_cases()
    if args.fixtures.is_dir():
        cases += fixture_cases(args.fixtures)
    else:
        print(f"render_parity: no fixtures at {args.fixtures}; random scenes only", file=sys.stderr)
    reports = [compare_backends(case.to("cuda")) for case in cases]
    problems = [p for r in reports for p in check_report(r)]
    print(table(reports))
    print("\n(cos: gradient cosine for a random-weight loss on images and alphas; dcos: for a loss on depths)")
    print("\n".join(problems) if problems else f"all within {json.dumps(THRESHOLDS)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "thresholds": THRESHOLDS,
                                        "reports": reports, "problems": problems}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
