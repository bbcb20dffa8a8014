"""The Triton scan kernels, run by Triton's CPU interpreter on tiny shapes, against the float64 reference.

TRITON_INTERPRET must be set before Triton is imported, and another test of this session may already
have imported it, so the kernels run in one subprocess (tests/ssm_triton_helpers.py) that reports the
relative errors of every output and every input's gradient as JSON. Tolerances: 1e-5 for float32
inputs (float32 state; errors are ~1e-7), 1e-2 for bfloat16 and float16 inputs (output rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

HELPER = Path(__file__).with_name("ssm_triton_helpers.py")
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(HELPER)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _errors(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "dtypes_ok"}


@pytest.mark.parametrize(
    "case, expected_keys",
    [
        ("1d_grouped_all_options", {"out0", "out1", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("1d_plain_segments", {"out0", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("1d_length_one", {"out0", "out1", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("1d_bare", {"out0", "du", "ddelta", "dA", "dB", "dC"}),
        ("1d_dispatch", {"out0", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("1d_reverse_all_options", {"out0", "out1", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("1d_strided_bc_reverse", {"out0", "out1", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("2d_mask_nonsquare", {"out0", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("2d_grouped", {"out0", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("2d_single_cell", {"out0", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("2d_aligned_width", {"out0", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}),
        ("2d_bare", {"out0", "du", "ddelta", "dA", "dB", "dC"}),
    ],
)
def test_float32_matches_reference_forward_and_backward(interpreted, case, expected_keys):
    result = interpreted[case]
    errors = _errors(result)
    assert set(errors) == expected_keys
    bad = {k: v for k, v in errors.items() if not v < 1e-5}
    assert not bad, f"{case}: relative errors above 1e-5: {bad}"
    assert result["dtypes_ok"], "gradients must come back in each input's dtype"


@pytest.mark.parametrize("case", ["1d_bf16", "1d_fp16", "1d_bf16_tile16", "1d_reverse_bf16_tile16"])
def test_half_precision_inputs_accumulate_in_float32(interpreted, case):
    result = interpreted[case]
    errors = _errors(result)
    assert len(errors) == 9
    bad = {k: v for k, v in errors.items() if not v < 1e-2}
    assert not bad, f"{case}: relative errors above 1e-2: {bad}"
    assert result["dtypes_ok"]


def test_longer_backward_walk_saves_fewer_column_states_and_same_gradients(interpreted):
    result = interpreted["2d_walk_memory"]
    # 4 tiles of 2 rows down a 16-wide grid, 4 channels, 3 states: walking 2 tiles a program keeps the
    # column state of 2 of them instead of 4 (float32), everything else saved is the same
    assert result["saved_bytes_walk1"] - result["saved_bytes_walk2"] == 2 * 4 * 3 * 16 * 4
    assert result["max_rel_diff"] < 1e-6


def test_padded_cells_do_not_reach_real_cells(interpreted):
    result = interpreted["2d_padding_ignored"]
    assert result["real_cells_changed"] < 1e-6
    # the padded cells' own outputs do change (their u, z and the state there moved): the check above
    # is not vacuous
    assert result["padded_cells_changed"] > 1e-2


def test_cpu_tensors_without_interpreter_are_a_config_error(monkeypatch):
    from mambascope.errors import ConfigError
    from mambascope.ssm.triton_scan import selective_scan_triton
    from mambascope.ssm.triton_scan2d import selective_scan_2d_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    u = torch.zeros(1, 2, 4)
    with pytest.raises(ConfigError, match="CUDA"):
        selective_scan_triton(u, u, torch.zeros(2, 3), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))
    g = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ConfigError, match="CUDA"):
        selective_scan_2d_triton(g, g, torch.zeros(2, 3), torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 4))


def test_specialisation_key_tells_apart_what_triton_specialises():
    from mambascope.ssm.triton_common import specialisation_key

    def spec(arg):
        return specialisation_key((arg,))[0]

    base = torch.zeros(64)
    assert spec(base) == spec(torch.ones(64))
    assert spec(base[4:]) == spec(base)  # 16 bytes further: still aligned
    assert spec(base[1:]) != spec(base)  # 4 bytes off the alignment
    assert spec(base.double()) != spec(base)
    assert spec(1) != spec(17) and spec(16) != spec(17) and spec(32) == spec(48)
    assert spec(2**31) != spec(2**31 - 16) and spec(2**63) != spec(2**62)
    assert spec(True) != spec(False) and spec(None) is None and spec(0.5) == spec(2.0)
    assert spec(True) != spec(1) and spec(torch.nn.Parameter(base)) == spec(base)


def test_host_size_helpers_match_tritons():
    """`pow2` and `cdiv` replace triton.next_power_of_2 and triton.cdiv in the wrappers' host code."""
    from mambascope.ssm.triton_common import cdiv, pow2

    assert [pow2(n) for n in range(0, 2100)] == [triton.next_power_of_2(max(n, 1)) for n in range(0, 2100)]
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in (1, 3, 8, 16, 17))


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: `run` is its C launcher, `[grid]` its runner (which builds
    launch metadata and calls the launch hooks)."""

    function, packed_metadata = "cu-function", "packed-metadata"

    def __init__(self, calls):
        self.calls = calls

    def run(self, *args):
        grid, (stream, function, metadata, launch_metadata, enter, exit_), rest = args[:3], args[3:9], args[9:]
        assert (stream, function, metadata) == ("stream-0", "cu-function", "packed-metadata")
        assert launch_metadata is enter is exit_ is None
        self.calls.append(("launcher", grid, rest))

    def __getitem__(self, grid):
        assert len(grid) == 3, "a compiled kernel's runner takes all three grid sizes"
        return lambda *args: self.calls.append(("runner", grid, args))


class _FakeKernel:
    """Stands in for a JITFunction: `kernel[grid](...)` is Triton's dispatch and returns the compiled kernel."""

    arg_names = ("x_ptr", "n", "BLOCK", "FLAG")

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def dispatch(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return _FakeCompiled(self.calls)

        return dispatch


def test_launch_reuses_the_compiled_kernel_only_for_the_same_specialisation(monkeypatch):
    from mambascope.ssm import triton_common

    monkeypatch.setattr(triton_common, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(triton_common, "current_stream", lambda device: f"stream-{device}")
    kernel = _FakeKernel()
    x = torch.zeros(64)
    triton_common.launch(kernel, (4,), x, 32, BLOCK=8, FLAG=True, num_warps=2)
    triton_common.launch(kernel, (5, 2), x, 48, BLOCK=8, FLAG=True, num_warps=2)
    triton_common.launch(kernel, (4,), x[1:], 32, BLOCK=8, FLAG=True, num_warps=2)  # misaligned pointer
    triton_common.launch(kernel, (4,), x, 32, BLOCK=16, FLAG=True, num_warps=2)  # another constexpr
    assert [c[0] for c in kernel.calls] == ["triton", "launcher", "triton", "triton"]
    # the C launcher takes every argument in signature order, constexprs included
    assert kernel.calls[1][1:] == ((5, 2, 1), (x, 48, 8, True))
    # while a launch hook listens (a profiler), launches go through the compiled kernel's runner
    monkeypatch.setattr(triton_common, "_no_launch_hooks", lambda: False)
    triton_common.launch(kernel, (3,), x, 16, BLOCK=8, FLAG=True, num_warps=2)
    assert kernel.calls[-1] == ("runner", (3, 1, 1), (x, 16, 8, True))


def test_launch_hooks_are_seen():
    from triton import knobs

    from mambascope.ssm import triton_common

    assert triton_common._no_launch_hooks()
    hook = knobs.runtime.launch_enter_hook

    def listener(metadata):
        return None

    hook.add(listener)
    try:
        assert not triton_common._no_launch_hooks()
    finally:
        hook.remove(listener)
    assert triton_common._no_launch_hooks()


@pytest.mark.parametrize("exact, rounded", [
    ("dwconv_3x3", "dwconv_5x5_bf16"), ("dwconv1d_causal", "dwconv1d_reverse_bf16"),
    ("dwconv1d_reverse", "dwconv1d_reverse_bf16"),
])
def test_fused_depthwise_conv_silu_matches_pytorch(interpreted, exact, rounded):
    """The Triton depthwise conv + bias + SiLU in front of the scans on a GPU (Mamba2D's "same" K×K conv,
    Mamba's causal 1D conv and its mirror for walks from the end): output and the gradients of input,
    weight and bias against PyTorch's conv and SiLU in float64."""
    exact, rounded = interpreted[exact], interpreted[rounded]
    assert set(_errors(exact)) == {"out0", "dx", "dw", "db"}
    assert max(_errors(exact).values()) < 1e-5, exact
    assert max(_errors(rounded).values()) < 1e-2, rounded
    assert exact["dtypes_ok"] and rounded["dtypes_ok"]
