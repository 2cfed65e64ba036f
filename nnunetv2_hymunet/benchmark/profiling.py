"""Efficiency profile of several networks on one plan: parameters, FLOPs, latency, peak memory, sliding window.

How each number is measured (also written into every report):

- FLOPs per patch: `torch.utils.flop_counter.FlopCounterMode` on one sample (batch 1, inference, no deep
  supervision), run on fake tensors so any patch size costs nothing. It counts convolutions and matrix products
  (2 FLOPs per multiply-add), and the selective scan through the formula registered for its custom op:
  B * d_inner * L * (7 * N + k) per scan call (B includes the stacked scan directions; see
  nnunetv2_hymunet.ssm.selective_scan.selective_scan_flops).
- Latency: forward pass (eval, no_grad, no deep supervision) and one training step (train mode, deep supervision on,
  cross-entropy on every output, SGD with Nesterov momentum 0.99, gradient clipping at 12: nnU-Net's optimiser)
  at the chosen batch size. Every model is built first; then warm-up rounds and timed rounds go round-robin over the
  models (interleaved), so a load change on a shared machine hits all models alike. Medians are reported.
  On CUDA both run under autocast, as nnU-Net trains and predicts.
- Peak memory: CUDA: `max_memory_allocated` minus the memory allocated before the step. CPU: the process's resident
  set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the step, with glibc
  told to return large blocks to the system so that freed memory of an earlier model does not hide a peak.
- Sliding window: nnU-Net's own `nnUNetPredictor` (`manual_initialization` + `predict_sliding_window_return_logits`,
  tile step 0.5, Gaussian weighting, no mirroring) on one random image of the given shape.
"""

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time

from nnunetv2_hymunet.benchmark.models import build_training_network, set_deep_supervision
from nnunetv2_hymunet.benchmark.presets import ProfilePlan
from nnunetv2_hymunet.errors import HyMUNetError

# ---------------------------------------------------------------- FLOPs


def count_flops(network, input_shape) -> dict:
    """{'counted': FlopCounterMode FLOPs without the scan, 'scan_analytic': the scan's} for one forward pass.

    Runs on fake tensors (shapes only: any patch size costs no memory); the scan is counted through the FLOP formula
    registered for its custom op (nnunetv2_hymunet.ssm.selective_scan.counting_scan_flops)."""
    import copy

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from nnunetv2_hymunet.ssm.selective_scan import counting_scan_flops

    network = copy.deepcopy(network).eval()
    set_deep_supervision(network, False)
    with FakeTensorMode() as fake:
        state = {name: fake.from_tensor(t) for name, t in [*network.named_parameters(), *network.named_buffers()]}
        x = torch.empty(input_shape)
    with torch.no_grad(), counting_scan_flops(), FlopCounterMode(display=False) as counter, fake:
        torch.func.functional_call(network, state, (x,))
    scan = counter.get_flop_counts().get("Global", {}).get(torch.ops.hymunet.selective_scan, 0)
    return {"counted": int(counter.get_total_flops() - scan), "scan_analytic": int(scan)}


# ---------------------------------------------------------------- memory


class CpuPeakMemory:
    """Resident-set high-water mark of this process, resettable on Linux (also used by scripts/bench_scan.py)."""

    def __init__(self):
        self.method = "VmHWM after /proc/self/clear_refs reset"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = None
        self._libc = None
        with contextlib.suppress(OSError):
            self._libc = ctypes.CDLL("libc.so.6")
            # fixed mmap threshold (M_MMAP_THRESHOLD = -3): large tensors are mmapped and returned when freed
            self._libc.mallopt(-3, 128 * 1024)

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise HyMUNetError(f"/proc/self/status has no {field}")

    def measure(self, fn) -> float:
        """MiB the resident set grew above its level before `fn` at its peak."""
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = self._status_kib("VmRSS")
        fn()
        return (self._status_kib("VmHWM") - before) / 1024


def _peak_memory_mib(fn, device, cpu_meter) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if cpu_meter is None or cpu_meter.method is None:
        return float("nan")
    return cpu_meter.measure(fn)


# ---------------------------------------------------------------- one model


class _ModelUnderTest:
    def __init__(self, name: str, plan: ProfilePlan, device, batch_size: int):
        import torch

        self.name = name
        network, self.trainer, self.num_input_channels, self.num_outputs = build_training_network(name, plan)
        self.network_class = type(network).__name__
        self.parameters = sum(p.numel() for p in network.parameters())
        self.network = network.to(device)
        self.device = device
        patch = plan.configuration_dict["patch_size"]
        self.input_shape = (batch_size, self.num_input_channels, *patch)
        self.optimizer = torch.optim.SGD(
            self.network.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5
        )
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.input_shape, generator=generator).to(device)
        self.autocast = torch.autocast("cuda") if device.type == "cuda" else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.targets = None

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self):
        import torch

        self.network.eval()
        set_deep_supervision(self.network, False)
        with torch.no_grad(), self.autocast:
            self.network(self.x)
        self._sync()

    def train_step(self):
        import torch
        import torch.nn.functional as F

        self.network.train()
        set_deep_supervision(self.network, True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            outputs = self.network(self.x)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            if self.targets is None:  # one random label map per output resolution, made once
                generator = torch.Generator().manual_seed(1)
                self.targets = [
                    torch.randint(0, o.shape[1], (o.shape[0], *o.shape[2:]), generator=generator).to(self.device)
                    for o in outputs
                ]
            loss = sum(F.cross_entropy(o.float(), t) for o, t in zip(outputs, self.targets))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self._sync()

    def release(self):
        """Drop gradients and optimiser state so the next model's memory is measured alone."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def sliding_window_seconds(model: _ModelUnderTest, plan: ProfilePlan, case_shape) -> dict:
    """One case through nnU-Net's predictor: seconds and number of tiles."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    plans_manager, configuration_manager = plan.managers()
    patch = configuration_manager.patch_size
    spatial = tuple(case_shape)
    if len(patch) == 2 and len(spatial) == 2:
        spatial = (1, *spatial)  # nnU-Net hands 2D cases to the predictor as (c, 1, x, y)
    if len(spatial) != 3:
        raise HyMUNetError(f"--case-shape needs {len(patch)} values for this plan, got {list(case_shape)}")
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=model.device.type == "cuda",
        device=model.device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    model.network.eval()
    set_deep_supervision(model.network, False)
    predictor.manual_initialization(
        model.network, plans_manager, configuration_manager, None, plan.dataset_json, model.trainer, None
    )
    image = torch.randn((model.num_input_channels, *spatial), generator=torch.Generator().manual_seed(2))
    padded = [max(s, p) for s, p in zip(spatial[-len(patch) :], patch)]
    tiles = len(
        predictor._internal_get_sliding_window_slicers((spatial[0], *padded) if len(patch) == 2 else tuple(padded))
    )
    start = time.perf_counter()
    predictor.predict_sliding_window_return_logits(image)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return {"seconds": time.perf_counter() - start, "tiles": tiles, "case_shape": list(case_shape)}


# ---------------------------------------------------------------- all models


def _machine(device) -> dict:
    import torch

    info = {
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _scan_backend(device) -> str:
    from nnunetv2_hymunet.ssm.selective_scan import resolve_backend

    try:
        return resolve_backend(device)
    except HyMUNetError as e:
        return f"unavailable ({e})"


def profile_models(
    plan: ProfilePlan,
    models,
    device="cpu",
    batch_size: int = None,
    repeats: int = 3,
    warmup: int = 1,
    case_shape=None,
    sliding_window: bool = True,
    native_patch_size=None,
    threads: int = None,
    log=print,
) -> dict:
    """Profile `models` (see models.py) on `plan`; returns the JSON-ready result (see module docstring).

    threads: torch intra-op threads for the measurement (restored afterwards); default torch's own setting.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise HyMUNetError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _profile_models(
            plan, models, device, batch_size, repeats, warmup, case_shape, sliding_window, native_patch_size, log
        )
    finally:
        torch.set_num_threads(previous_threads)


def _profile_models(
    plan, models, device, batch_size, repeats, warmup, case_shape, sliding_window, native_patch_size, log
) -> dict:
    import torch

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HyMUNetError("--device cuda but torch sees no CUDA device")
    if repeats < 1 or warmup < 0:
        raise HyMUNetError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    if not models:
        raise HyMUNetError("--models: no model given")
    configuration = plan.configuration_dict
    if batch_size is None:
        batch_size = configuration["batch_size"] if device.type == "cuda" else min(2, configuration["batch_size"])
    load_before = os.getloadavg()
    log(
        f"Profiling {len(models)} models on {plan.source} [{plan.configuration}], patch {configuration['patch_size']}, "
        f"batch {batch_size}, device {device}, load average {load_before[0]:.2f}"
    )

    under_test = []
    for name in models:
        model = _ModelUnderTest(name, plan, device, batch_size)
        flops = count_flops(model.network, (1, *model.input_shape[1:]))
        native = None
        if native_patch_size is not None and list(native_patch_size) != list(configuration["patch_size"]):
            native = count_flops(model.network, (1, model.num_input_channels, *native_patch_size))
        model.flops, model.native_flops = flops, native
        under_test.append(model)
        log(f"  built {name}: {model.network_class}, {model.parameters / 1e6:.2f} M parameters")

    times = {m.name: {"forward": [], "step": []} for m in under_test}
    for round_index in range(warmup + repeats):
        for kind in ("forward", "step"):
            for model in under_test:
                elapsed = _timed(model.forward if kind == "forward" else model.train_step)
                if round_index >= warmup:
                    times[model.name][kind].append(elapsed)
        log(f"  round {round_index + 1}/{warmup + repeats}" + (" (warm-up)" if round_index < warmup else ""))

    cpu_meter = CpuPeakMemory() if device.type == "cpu" else None
    results = []
    for model in under_test:
        model.release()
        memory_forward = _peak_memory_mib(model.forward, device, cpu_meter)
        memory_step = _peak_memory_mib(model.train_step, device, cpu_meter)
        model.release()
        window = None
        if sliding_window:
            window = sliding_window_seconds(model, plan, case_shape or plan.case_shape)
            log(f"  {model.name}: sliding window {window['seconds']:.2f} s ({window['tiles']} tiles)")
        results.append(
            {
                "model": model.name,
                "trainer": model.trainer,
                "network_class": model.network_class,
                "parameters": model.parameters,
                "flops_counted": model.flops["counted"],
                "flops_scan_analytic": model.flops["scan_analytic"],
                "gflops": (model.flops["counted"] + model.flops["scan_analytic"]) / 1e9,
                "gflops_native_patch": (
                    None
                    if model.native_flops is None
                    else (model.native_flops["counted"] + model.native_flops["scan_analytic"]) / 1e9
                ),
                "forward_ms_median": statistics.median(times[model.name]["forward"]),
                "forward_ms": times[model.name]["forward"],
                "step_ms_median": statistics.median(times[model.name]["step"]),
                "step_ms": times[model.name]["step"],
                "peak_memory_forward_mib": memory_forward,
                "peak_memory_step_mib": memory_step,
                "sliding_window": window,
            }
        )
        model.network.to("cpu")
    return {
        "plan": {
            "source": plan.source,
            "configuration": plan.configuration,
            "patch_size": list(configuration["patch_size"]),
            "native_patch_size": list(native_patch_size) if native_patch_size else None,
            "num_input_channels": under_test[0].num_input_channels,
            "num_outputs": under_test[0].num_outputs,
        },
        "settings": {
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "sliding_window": "tile step 0.5, Gaussian, no mirroring" if sliding_window else None,
            "memory_method": (
                "max_memory_allocated"
                if device.type == "cuda"
                else (cpu_meter.method if cpu_meter and cpu_meter.method else "unavailable")
            ),
            "flops_method": "FlopCounterMode (batch 1, fake tensors); selective scan through its registered "
            "formula B*d_inner*L*(7*N + k), k <= 10 per token and channel",
        },
        "machine": {
            **_machine(device),
            "scan_backend": _scan_backend(device),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
        },
        "models": results,
    }
