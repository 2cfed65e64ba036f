"""Benchmark: `hymunet convert isic2018` against simply reading and writing the same files once.

A fake ISIC 2018 training set of N images (~1000x700 px JPEGs and 0/255 PNG masks) is written first. Then, side by
side in one run, with the files already in the page cache:
- baseline: open each JPEG and mask with Pillow and save both as PNG (the same library and PNG compression level
  the converter uses), no pairing, no validation;
- converter: convert_isic2018 (pairing, validation of every file, atomic write, dataset.json), serial.
Passes alternate (baseline, converter, converter, baseline, ...) so that drift in machine load hits both alike.
The converted image PNGs are compared byte for byte with the baseline's, to show both did the same encoding work.

    .venv/bin/python scripts/bench_conversion.py                    # documented run: 1000 images
    .venv/bin/python scripts/bench_conversion.py --num-images 50    # quick check
"""

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from nnunetv2_hymunet.conversion.fake_releases import FAKE_NOTICE
from nnunetv2_hymunet.conversion.image_files import PNG_COMPRESS_LEVEL
from nnunetv2_hymunet.conversion.isic2018 import convert_isic2018
from nnunetv2_hymunet.conversion.synthetic import make_isic_like_case

IMAGES = "ISIC2018_Task1-2_Training_Input"
TRUTH = "ISIC2018_Task1_Training_GroundTruth"


def write_release(root: str, num_images: int, height: int, width: int, num_distinct: int, seed: int) -> None:
    """Full-size synthesis takes ~0.5 s per image, so a pool of distinct cases is varied (flip, shift, gain)."""
    rng = np.random.default_rng(seed)
    for folder in (IMAGES, TRUTH):
        os.makedirs(os.path.join(root, folder))
        for name in ("ATTRIBUTION.txt", "LICENSE.txt"):
            with open(os.path.join(root, folder, name), "w") as f:
                f.write(FAKE_NOTICE)
    pool = [make_isic_like_case(rng, height, width) for _ in range(min(num_distinct, num_images))]
    for index in range(num_images):
        rgb, mask = pool[index % len(pool)]
        shift = (int(rng.integers(-40, 41)), int(rng.integers(-40, 41)))
        rgb = np.roll(rgb, shift, axis=(0, 1))
        mask = np.roll(mask, shift, axis=(0, 1))
        if rng.random() < 0.5:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        rgb = np.clip(rgb * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
        case_id = f"ISIC_{index:07d}"
        Image.fromarray(rgb).save(os.path.join(root, IMAGES, f"{case_id}.jpg"), quality=95)
        Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(
            os.path.join(root, TRUTH, f"{case_id}_segmentation.png")
        )


def warm_page_cache(root: str) -> int:
    total = 0
    for folder in (IMAGES, TRUTH):
        for name in os.listdir(os.path.join(root, folder)):
            with open(os.path.join(root, folder, name), "rb") as f:
                total += len(f.read())
    return total


def baseline(root: str, out: str) -> None:
    """Read every JPEG and mask once and write them as PNG with the same library: the floor for any converter."""
    os.makedirs(os.path.join(out, "images"))
    os.makedirs(os.path.join(out, "masks"))
    for name in sorted(os.listdir(os.path.join(root, IMAGES))):
        if not name.endswith(".jpg"):
            continue
        case_id = name[:-4]
        with Image.open(os.path.join(root, IMAGES, name)) as image:
            image.save(
                os.path.join(out, "images", f"{case_id}_0000.png"), format="PNG", compress_level=PNG_COMPRESS_LEVEL
            )
        with Image.open(os.path.join(root, TRUTH, f"{case_id}_segmentation.png")) as mask:
            mask.save(os.path.join(out, "masks", f"{case_id}.png"), format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def converter(root: str, out: str, num_workers: int) -> None:
    convert_isic2018(root, out, dataset_id=1, num_workers=num_workers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="images in the fake release (default 1000)")
    parser.add_argument("--height", type=int, default=700)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--num-distinct", type=int, default=24, help="distinct synthetic cases before variation")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="pairs of passes per method, in ABBA order (default 1: baseline, converter)",
    )
    parser.add_argument(
        "--parallel-workers", type=int, default=0, help="also time the converter with this many workers (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench_conversion_", dir=args.workdir)
    try:
        release = os.path.join(work, "release")
        start = time.perf_counter()
        write_release(release, args.num_images, args.height, args.width, args.num_distinct, args.seed)
        size_mb = warm_page_cache(release) / 1e6
        print(
            f"fake release: {args.num_images} images {args.width}x{args.height} + masks, {size_mb:.1f} MB, "
            f"written in {time.perf_counter() - start:.1f} s"
        )
        print(
            f"load average before timing: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
            f"{os.getloadavg()[2]:.2f} on {os.cpu_count()} CPUs"
        )

        timings = {"baseline": [], "converter": []}
        order = []
        for _ in range(args.repeats):
            order += ["baseline", "converter"] if len(order) % 4 == 0 else ["converter", "baseline"]
        for run, method in enumerate(order):
            out = os.path.join(work, f"{method}_{run}")
            start = time.perf_counter()
            if method == "baseline":
                baseline(release, out)
            else:
                converter(release, out, num_workers=1)
            timings[method].append(time.perf_counter() - start)
            print(f"  pass {run + 1}: {method:9s} {timings[method][-1]:7.2f} s")

        converted_images = os.path.join(
            work, f"converter_{order.index('converter')}", "Dataset001_ISIC2018", "imagesTr"
        )
        baseline_images = os.path.join(work, f"baseline_{order.index('baseline')}", "images")
        names = sorted(os.listdir(baseline_images))
        same = all(
            filecmp.cmp(os.path.join(baseline_images, n), os.path.join(converted_images, n), shallow=False)
            for n in names
        )
        print(f"converted image PNGs byte-identical to the baseline's: {same} ({len(names)} files)")

        base, conv = sum(timings["baseline"]), sum(timings["converter"])
        per_image = 1000 * base / (len(timings["baseline"]) * args.num_images)
        print(
            f"baseline (read + write once): {base / len(timings['baseline']):.2f} s per pass "
            f"({per_image:.1f} ms per image)"
        )
        print(f"converter, serial:            {conv / len(timings['converter']):.2f} s per pass")
        print(f"ratio converter / baseline:   {conv / base:.3f}")
        if args.parallel_workers > 1:
            out = os.path.join(work, "converter_parallel")
            start = time.perf_counter()
            converter(release, out, num_workers=args.parallel_workers)
            elapsed = time.perf_counter() - start
            print(
                f"converter, {args.parallel_workers} workers:         {elapsed:.2f} s "
                f"(ratio to serial baseline {elapsed / (base / len(timings['baseline'])):.3f})"
            )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
