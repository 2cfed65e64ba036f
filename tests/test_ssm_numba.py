"""The numba backend is an optional extra: importing leaves numba's configuration alone, and without numba the CPU
falls back to the torch scan. Each case runs in a fresh interpreter (numba's thread pool starts once per process)."""

import os
import subprocess
import sys
import textwrap

from nnunetv2_hymunet.ssm.selective_scan import ENV_VAR

SCAN = """
import torch
from nnunetv2_hymunet.ssm import selective_scan_fn

def scan():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 4, 40, generator=g)
    B = torch.randn(2, 3, 40, generator=g)
    return selective_scan_fn(u, u.sigmoid(), -torch.rand(4, 3, generator=g), B, B)
"""


def _run(script: str, prelude: str = "", **env_overrides) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "NUMBA_THREADING_LAYER")}
    env.update(env_overrides)
    code = prelude + textwrap.dedent(SCAN) + textwrap.dedent(script)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_import_changes_no_numba_state_and_first_scan_picks_the_fork_safe_layer():
    out = _run(
        """
        import numba
        from numba.np.ufunc import parallel
        import nnunetv2_hymunet.ssm.scan_numba
        from nnunetv2_hymunet.ssm.selective_scan import numba_available
        assert numba_available()
        assert numba.config.THREADING_LAYER == "default", numba.config.THREADING_LAYER
        assert not parallel._is_initialized
        scan()
        print(numba.config.THREADING_LAYER, numba.threading_layer())
    """,
        **{ENV_VAR: "numba"},
    )
    assert out.split() == ["workqueue", "workqueue"]


def test_a_numba_pool_started_by_other_code_is_left_alone():
    out = _run(
        """
        import os
        import numba
        import numpy as np

        @numba.njit(parallel=True)
        def total(x):
            s = 0.0
            for i in numba.prange(x.shape[0]):
                s += x[i]
            return s

        assert total(np.ones(1000)) == 1000.0  # the user's code starts numba's pool first, with numba's own choice
        layer = numba.threading_layer()
        numba_out = scan()
        os.environ["HYMUNET_SCAN_BACKEND"] = "reference"
        torch.testing.assert_close(numba_out, scan())
        print(numba.config.THREADING_LAYER, numba.threading_layer() == layer)
    """,
        **{ENV_VAR: "numba"},
    )
    assert out.split() == ["default", "True"]


def test_without_numba_the_cpu_falls_back_to_torch(tmp_path):
    out = _run(
        """
        import os
        from nnunetv2_hymunet.errors import HyMUNetError
        from nnunetv2_hymunet.ssm import resolve_backend
        assert resolve_backend(torch.device("cpu")) == "torch", resolve_backend(torch.device("cpu"))
        fallback = scan()
        try:
            resolve_backend(torch.device("cpu"), "numba")
        except HyMUNetError as e:
            print(e)
        os.environ["HYMUNET_SCAN_BACKEND"] = "reference"
        torch.testing.assert_close(fallback, scan())
        print("ok")
    """,
        prelude="import sys\nsys.modules['numba'] = None  # numba not installed: importing it raises ImportError\n",
        CC="no-such-compiler",
        HYMUNET_CACHE_DIR=str(tmp_path),
    )
    assert "pip install 'nnunetv2-hymunet[numba]'" in out
    assert out.strip().endswith("ok")
