"""HD95 speed on a BraTS-sized pair (155x240x240): nnunetv2_hymunet's compute_case_metrics against MONAI's
compute_hausdorff_distance(percentile=95), side by side in one process, on the same inputs.

The pair is a realistic blob: a perturbed ellipsoid (ellipsoid + smoothed random field, thresholded) as reference
and the same with a smooth boundary perturbation as prediction. Two scenarios: "close" (about 3% of the foreground
differs, at the boundary, like a good prediction) and "rough" (a stronger boundary perturbation plus a false-positive
island, like a weak one).
Also timed: a Euclidean-distance-transform variant over the cropped union box (the approach MONAI and medpy take),
to show why the library uses a k-d tree on surface voxels. MONAI is a bench-only dependency:
    .venv/bin/pip install -c scripts/constraints-cpu.txt monai
Without MONAI the script still runs and compares against the EDT baseline only (and says so).

Usage: .venv/bin/python scripts/bench_hd95.py [--repeats 5] [--seed 0]
"""

import argparse
import os
import platform
import time
import warnings

import numpy as np
from scipy import ndimage

from nnunetv2_hymunet.evaluation.metrics import compute_case_metrics

SHAPE = (155, 240, 240)


def realistic_pair(seed: int, shape=SHAPE, noise=0.5, spurious_blob=False):
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.standard_normal(tuple((n + 1) // 2 for n in shape)).astype(np.float32), 6)
    field = ndimage.zoom(coarse, 2, order=1)[tuple(slice(0, n) for n in shape)]
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    level = (zz / 0.6) ** 2 + (yy / 0.5) ** 2 + (xx / 0.45) ** 2 + 8 * field
    boundary_noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2)
    pred = level + noise * boundary_noise < 1.0
    if spurious_blob:  # a false-positive island away from the lesion, as weak predictions have
        pred |= (zz - 0.7) ** 2 + (yy + 0.75) ** 2 + (xx - 0.7) ** 2 < 0.1**2
    return pred, level < 1.0  # prediction, reference


def edt_hd95(pred, ref, spacing):
    """Baseline: surfaces by erosion, distance transforms over the cropped union box, max of directed P95."""
    box = ndimage.find_objects((pred | ref).view(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, pred.shape))
    p, r = pred[box], ref[box]
    sp, sr = p & ~ndimage.binary_erosion(p, border_value=0), r & ~ndimage.binary_erosion(r, border_value=0)
    d_pr = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    d_rp = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    return max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))


def interleaved_medians(candidates, repeats):
    """Median seconds and last value per candidate; rounds alternate between candidates so that load changes on a
    shared machine hit all of them alike."""
    times = {name: [] for name, _ in candidates}
    values = {}
    for _ in range(repeats):
        for name, fn in candidates:
            start = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - start)
    return [(name, float(np.median(times[name])), values[name]) for name, _ in candidates]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average before "
        f"{os.getloadavg()[0]:.2f}"
    )
    for scenario, kwargs in (("close", {}), ("rough", {"noise": 3.0, "spurious_blob": True})):
        run_scenario(scenario, realistic_pair(args.seed, **kwargs), args.repeats)
    print(f"load average after {os.getloadavg()[0]:.2f}")


def run_scenario(scenario, pair, repeats):
    pred, ref = pair
    spacing = (1.0, 1.0, 1.0)
    print(
        f"\nscenario {scenario}: shape {SHAPE}, reference {int(ref.sum())} voxels, prediction {int(pred.sum())}, "
        f"differing {int((pred ^ ref).sum())}; median of {repeats} interleaved runs each"
    )
    candidates = [
        (
            "nnunetv2_hymunet compute_case_metrics (all metrics)",
            lambda: compute_case_metrics(pred, ref, spacing)["hd95"],
        ),
        ("EDT on cropped union box (baseline)", lambda: edt_hd95(pred, ref, spacing)),
    ]
    try:
        import torch
        from monai import __version__ as monai_version
        from monai.metrics import compute_hausdorff_distance

        warnings.filterwarnings("ignore", module="monai")
        p, r = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
        candidates.append(
            (
                f"MONAI {monai_version} compute_hausdorff_distance(percentile=95)",
                lambda: float(compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))),
            )
        )
    except ImportError:
        print("MONAI is not installed: comparing against the EDT baseline only")
    rows = interleaved_medians(candidates, repeats)
    ours_t, ours_hd95 = rows[0][1], rows[0][2]
    print("| implementation | time (s) | HD95 | time ratio to ours |")
    print("|---|---|---|---|")
    for name, seconds, value in rows:
        print(f"| {name} | {seconds:.3f} | {value:.4f} | {seconds / ours_t:.1f}x |")
    mismatched = [name for name, _, value in rows if not np.isclose(value, ours_hd95, rtol=1e-6)]
    if mismatched:
        print(f"WARNING: HD95 differs from ours for: {', '.join(mismatched)}")


if __name__ == "__main__":
    main()
