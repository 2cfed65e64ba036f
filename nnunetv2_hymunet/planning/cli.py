"""`hymunet plan`: put HyMUNet into an nnU-Net plans file (the `-p nnUNetHyMUNetPlans` route)."""

import argparse
import os


def plan(args: argparse.Namespace) -> int:
    from nnunetv2_hymunet.errors import HyMUNetError
    from nnunetv2_hymunet.planning.plans_writer import write_hymunet_plans

    try:
        target, summaries = write_hymunet_plans(
            args.dataset, args.configurations, args.preset, args.gpu_memory_gb, args.plans, args.source_plans
        )
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        # the JSON files parsed but lack what nnU-Net's plans / dataset.json always hold
        raise HyMUNetError(
            f"-d {args.dataset}: the source plans ({args.source_plans or 'nnUNetPlans'}) or "
            f"dataset.json in nnUNet_preprocessed are malformed ({type(e).__name__}: {e}); re-run "
            "nnUNetv2_plan_and_preprocess"
        ) from None
    for name, s in summaries.items():
        src, hy = s["source"], s["hymunet"]
        ratio = hy["feature_map_elements"] / src["feature_map_elements"]
        print(
            f"{name}: {src['network']} batch {src['batch_size']} patch {src['patch_size']} -> HyMUNet batch "
            f"{hy['batch_size']} patch {hy['patch_size']} (memory estimate per sample x{ratio:.2f} of "
            f"{src['network']} at that patch{'' if s['fits_target'] else '; ABOVE the GPU memory target'})"
            + (f", knobs {hy['knobs']}" if hy["knobs"] else "")
        )
    plans_name = os.path.splitext(os.path.basename(target))[0]
    print(f"wrote {target}")
    print(
        f"train with: nnUNetv2_train {args.dataset} CONFIGURATION FOLD -p {plans_name}  (stock trainer; "
        f"nnUNet_compile=f recommended), or with -tr nnUNetTrainerHyMUNet -p {plans_name}"
    )
    return 0


def add_subparsers(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="write nnUNetHyMUNetPlans.json (HyMUNet in nnU-Net plans, reusing the preprocessed data)",
        description="Derive HyMUNet plans from nnU-Net's plans of a dataset (run nnUNetv2_plan_and_preprocess "
        "first) with nnUNetPlannerHyMUNet: nnU-Net's planning loop at each configuration's spacing, sized with "
        "HyMUNet's own memory estimate (batch first, then patch). The result names nnunetv2_hymunet.network.HyMUNet "
        "with its explicit arch_kwargs (blocks per stage, decoder convs, Mamba stages, every knob) and keeps the "
        "data identifiers, so the preprocessed data is reused.",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id, e.g. 501 or Dataset501_ISIC2018")
    p.add_argument(
        "-c",
        "--configuration",
        dest="configurations",
        nargs="+",
        default=None,
        help="configurations to convert (default: every configuration of the source plans; "
        "3d_cascade_fullres follows 3d_fullres)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="plans preset JSON (a path, or a name in the repository's plans/ folder such as "
        "isic2018_2d): hybrid knobs, batch and patch size",
    )
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="GPU memory target for batch/patch sizing (default: the preset's, else 8 like nnUNetPlans)",
    )
    p.add_argument(
        "-p",
        "--plans",
        default=None,
        help="plans identifier to write, then given to nnUNetv2_train -p (default nnUNetHyMUNetPlans)",
    )
    p.add_argument(
        "--source-plans",
        default=None,
        help="nnU-Net plans to derive from (default nnUNetPlans; e.g. nnUNetResEncUNetMPlans)",
    )
    p.set_defaults(func=plan)
