"""Batch 1's GEMV (Chapter 7.3.2): the Triton kernel against x @ weight.T on fresh inputs, its refusals, and
`linear`: F.linear everywhere but one row on a GPU, where it measures once per weight shape and reuses
the choice (exercised on the CPU with a fake timer)."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mini_infer.kernels  # noqa: F401  (Triton's interpreter when there is no GPU)
from mini_infer.kernels import gemv
from mini_infer.kernels.gemv import gemv_triton, linear

DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
KNOBS = [(1, 64, 4, 1), (4, 32, 4, 3), (8, 256, 4, 2)]  # the last: BLOCK_K longer than every K


def operands(n, k, dtype, device, bias):
    x = torch.randn(1, k).to(dtype).to(device)  # fresh inputs each run
    w = (torch.randn(n, k) / k**0.5).to(dtype).to(device)
    b = torch.randn(n).to(dtype).to(device) if bias else None
    return x, w, b


def reference(x, w, b):
    y = x.float() @ w.float().T
    return (y if b is None else y + b.float()).to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n,k", [(5, 17), (33, 100), (70, 64)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_matches_the_reference(n, k, bias, dtype, device):
    x, w, b = operands(n, k, dtype, device, bias)
    for knobs in KNOBS:
        got = gemv_triton(x, w, b, *knobs)
        assert got.shape == (1, n) and got.dtype == dtype
        torch.testing.assert_close(got, reference(x, w, b), **TOL[dtype])


ONE = (1, 8, 4, 1)  # knobs that are fine


@pytest.mark.parametrize(
    "x,w,b,knobs,match",
    [
        (torch.zeros(2, 8), torch.zeros(4, 8), None, ONE, "one row"),
        (torch.zeros(8), torch.zeros(4, 8), None, ONE, "one row"),
        (torch.zeros(1, 6), torch.zeros(4, 8), None, ONE, "columns"),
        (torch.zeros(1, 16)[:, ::2], torch.zeros(4, 8), None, ONE, "unit stride"),
        (torch.zeros(1, 8), torch.zeros(8, 4).T, None, ONE, "unit stride"),
        (torch.zeros(1, 8), torch.zeros(4, 8), torch.zeros(4, 2)[:, 0], ONE, "unit stride"),
        (torch.zeros(1, 8), torch.zeros(4, 8), None, (3, 8, 4, 1), "block_n must be a power"),
        (torch.zeros(1, 8), torch.zeros(4, 8), None, (0, 8, 4, 1), "block_n must be a power"),
        (torch.zeros(1, 8), torch.zeros(4, 8), None, (1, 48, 4, 1), "block_k must be a power"),
        (torch.zeros(1, 8), torch.zeros(4, 8).half(), None, ONE, "x's dtype"),
        (torch.zeros(1, 8), torch.zeros(4, 8), torch.zeros(4).double(), ONE, "x's dtype"),
    ],
    ids=[
        "two_rows",
        "1d",
        "k",
        "strided_x",
        "strided_w",
        "strided_bias",
        "bn3",
        "bn0",
        "bk48",
        "weight_dtype",
        "bias_dtype",
    ],
)
def test_gemv_refuses(x, w, b, knobs, match):
    with pytest.raises(ValueError, match=match):
        gemv_triton(x, w, b, *knobs)


@pytest.mark.parametrize("shape", [(1, 33), (2, 33), (33,), (2, 1, 33)], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_linear_on_the_cpu_is_f_linear(shape, bias):
    x, (_, w, b) = torch.randn(shape), operands(70, 33, torch.float32, "cpu", bias)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))


@pytest.fixture
def fake_gpu(monkeypatch):
    """`linear` measuring on CPU tensors (gemv_triton interpreted), with a fake timer: the list of the
    candidates it timed, each a knob set or None (F.linear), and a dict of fake times by candidate (F.linear:
    10, knob sets 20 unless set). Also sets whether the current stream is capturing: capturing[0]."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs gemv_triton on CPU tensors: Triton's interpreter only")
    timed, times, capturing = [], {None: 10.0}, [False]

    def do_bench(run, warmup, rep, return_mode):
        # run: partial(F.linear, x, w, b) or partial(gemv_triton, x, w, b, *knobs)
        knobs = tuple(run.args[3:]) or None
        timed.append(knobs)
        run()
        return times.get(knobs, 20.0)

    monkeypatch.setattr(gemv, "MEASURED_ON", ("cpu",))
    monkeypatch.setattr(gemv, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(gemv, "_choices", {})
    monkeypatch.setattr(gemv, "_enabled", True)
    return timed, times, capturing


def test_linear_measures_each_shape_once_and_reuses_the_fastest(fake_gpu):
    timed, times, _ = fake_gpu
    x, w, b = operands(70, 300, torch.float32, "cpu", True)
    # K = 300: only the knob sets with BLOCK_K <= 512 are timed, beside F.linear
    fitting = [kn for kn in gemv.GEMV_KNOBS if kn[1] <= 512]
    assert 0 < len(fitting) < len(gemv.GEMV_KNOBS)
    times[fitting[-1]] = 5.0  # faster than F.linear's 10
    for _ in range(3):
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    assert timed == [None, *fitting]  # once, however often it is called
    assert gemv._choices == {(70, 300, torch.float32, True, x.device): fitting[-1]}
    # another key (no bias) is measured on its own; two rows are never measured
    linear(x, w)
    linear(torch.randn(2, 300), w, b)
    assert len(timed) == 2 * (1 + len(fitting)) and len(gemv._choices) == 2


def test_linear_keeps_f_linear_where_it_is_faster(fake_gpu, monkeypatch):
    timed, _, _ = fake_gpu
    x, w, _ = operands(33, 17, torch.float32, "cpu", False)
    linear(x, w)
    assert gemv._choices[(33, 17, torch.float32, False, x.device)] is None
    # K = 17 is shorter than every knob set's BLOCK_K: all are timed rather than none
    assert timed == [None, *gemv.GEMV_KNOBS]

    def lost(*args):
        raise AssertionError("gemv_triton ran after losing")

    monkeypatch.setattr(gemv, "gemv_triton", lost)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_linear_never_measures_while_capturing(fake_gpu):
    timed, times, capturing = fake_gpu
    x, w, _ = operands(33, 64, torch.float32, "cpu", False)
    times.update({kn: 1.0 for kn in gemv.GEMV_KNOBS})  # Triton faster at every knob set
    capturing[0] = True
    assert torch.equal(linear(x, w), F.linear(x, w))  # not measured: F.linear, and nothing cached
    assert timed == [] and gemv._choices == {}
    capturing[0] = False
    linear(x, w)  # measured now
    measured = len(timed)
    capturing[0] = True
    torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-4, rtol=1e-4)
    assert len(timed) == measured  # the cached choice, not a new measurement


def test_use_gemv_false_sends_everything_to_f_linear_and_forgets(fake_gpu):
    timed, _, _ = fake_gpu
    x, w, _ = operands(33, 64, torch.float32, "cpu", False)
    linear(x, w)
    assert gemv._choices
    try:
        gemv.use_gemv(False)
        assert not gemv._choices
        timed.clear()
        assert torch.equal(linear(x, w), F.linear(x, w)) and timed == []
    finally:
        gemv.use_gemv(True)


def test_linear_does_not_measure_what_the_kernel_cannot_compute(fake_gpu):
    timed, _, _ = fake_gpu
    x, w, b = operands(33, 64, torch.float32, "cpu", True)
    w.requires_grad_(True)
    linear(x, w, b)  # autograd would record it
    with pytest.raises(RuntimeError):  # dtypes differ: F.linear's error
        linear(x, w.detach().half())
    linear(x[:, ::2], w.detach()[:, :32])  # strided x
    assert timed == []
    with torch.no_grad():
        linear(x, w, b)
    assert timed


def test_the_engine_warm_up_measures_every_batch_1_shape_first(fake_gpu, monkeypatch):
    """ModelRunner._warm_up runs one token's forward and logits before it counts the activations' peak, so
    `linear` has measured every one-row product of the model (the q/k/v, o, gate/up, down and LM-head
    shapes) before any request and before the peak (its timing is no activation)."""
    from helpers import TINY_DUMMY
    from mini_infer.config import ModelConfig
    from mini_infer.layers.sampler import Sampler
    from mini_infer.models.llama import LlamaForCausalLM
    from mini_infer.worker.model_runner import ModelRunner

    config = ModelConfig.from_hf(TINY_DUMMY)
    runner = SimpleNamespace(
        model=LlamaForCausalLM(config), sampler=Sampler(), device=torch.device("cpu")
    )
    events = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device: events.append(len(gemv._choices))
    )
    ModelRunner._warm_up(runner, num_tokens=6, logit_rows=2)
    h, q, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d, i = config.head_dim, config.intermediate_size
    shapes = {((q + 2 * kv) * d, h), (h, q * d), (2 * i, h), (h, i), (config.vocab_size, h)}
    assert {key[:2] for key in gemv._choices} == shapes
    assert events == [len(shapes)]  # all measured before the peak was reset


def test_gemv_reads_a_weight_with_strided_rows():
    """Rows of the weight further apart than K (a slice of a wider matrix): stride(0) is the kernel's."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("runs Triton: a GPU or the interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wide = torch.randn(33, 150, device=device)
    x, w = torch.randn(1, 100, device=device), wide[:, :100]
    assert w.stride(0) == 150
    torch.testing.assert_close(gemv_triton(x, w, None, 8, 64, 4, 2), x @ w.T, atol=1e-4, rtol=1e-4)
