"""Batch 1's GEMV (Chapter 7.3.2): the Triton kernel against x @ weight.T on fresh inputs, with its
prologues (7.3.3: SiLU-and-mul, RMSNorm with and without the residual) against the separate kernels'
references, its refusals, and `linear` / `rms_norm_linear`: the separate kernels and F.linear everywhere
but one row on a GPU, where they measure once per key and reuse the choice (exercised on the CPU with a
fake timer)."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mini_infer.kernels  # noqa: F401  (Triton's interpreter when there is no GPU)
from mini_infer.kernels import gemv
from mini_infer.kernels.activation import silu_and_mul_ref
from mini_infer.kernels.gemv import gemv_triton, linear, rms_norm_linear
from mini_infer.kernels.rmsnorm import rms_norm_ref

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


def norm_operands(k, dtype, device):
    residual = torch.randn(1, k).to(dtype).to(device)
    return (torch.rand(k) + 0.5).to(dtype).to(device), residual


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n,k", [(5, 17), (70, 100)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_prologues_match_the_separate_kernels(n, k, bias, dtype, device):
    """7.3.3: SwiGLU's activation and RMSNorm (with and without the residual add) computed as the kernel
    reads x give the product of the separate kernels' references, and the residual stream they give."""
    x, w, b = operands(n, k, dtype, device, bias)
    gate_up = torch.randn(1, 2 * k).to(dtype).to(device)
    norm_weight, residual = norm_operands(k, dtype, device)
    before = residual.clone()
    # the residual sum is rounded to the dtype; the interpreter's bf16 rounding is not always PyTorch's
    sum_tol = 2**-7 if (dtype, device) == (torch.bfloat16, "cpu") else 0.0
    for knobs in KNOBS:
        got = gemv_triton(gate_up, w, b, *knobs, act="silu_and_mul")
        torch.testing.assert_close(got, reference(silu_and_mul_ref(gate_up), w, b), **TOL[dtype])
        got, stream = gemv_triton(x, w, b, *knobs, norm=(norm_weight, 1e-5, None))
        assert stream is x
        torch.testing.assert_close(
            got, reference(rms_norm_ref(x, norm_weight, 1e-5), w, b), **TOL[dtype]
        )
        got, stream = gemv_triton(x, w, b, *knobs, norm=(norm_weight, 1e-5, residual))
        normed, want_stream = rms_norm_ref(x, norm_weight, 1e-5, before.clone())
        assert torch.equal(
            residual, before
        )  # a new tensor holds the stream; the residual is untouched
        torch.testing.assert_close(stream, want_stream, rtol=sum_tol, atol=0)
        torch.testing.assert_close(got, reference(normed, w, b), **TOL[dtype])


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


Z = torch.zeros


@pytest.mark.parametrize(
    "x,kwargs,match",
    [
        (Z(1, 8), dict(act="gelu"), "unknown act"),
        (Z(1, 16), dict(act="silu_and_mul", norm=(Z(8), 1e-5, None)), "not both"),
        (Z(1, 8), dict(act="silu_and_mul"), "gate"),
        (Z(1, 8), dict(norm=(Z(4), 1e-5, None)), "norm weight must be"),
        (Z(1, 8), dict(norm=(Z(8).half(), 1e-5, None)), "norm weight of x's dtype"),
        (Z(1, 8), dict(norm=(Z(8), 1e-5, Z(2, 8))), "residual must be"),
        (Z(1, 8), dict(norm=(Z(8), 1e-5, Z(1, 16)[:, ::2])), "residual with unit stride"),
        (Z(1, 0), dict(norm=(Z(0), 1e-5, Z(1, 0))), "rows and columns"),
    ],
    ids=[
        "act",
        "act_and_norm",
        "act_k",
        "norm_shape",
        "norm_dtype",
        "residual_shape",
        "residual_stride",
        "empty",
    ],
)
def test_gemv_prologues_refuse(x, kwargs, match):
    weight = Z(4, 0) if x.shape[1] == 0 else Z(4, 8)
    with pytest.raises(ValueError, match=match):
        gemv_triton(x, weight, None, *ONE, **kwargs)
    if "act" in kwargs and "norm" not in kwargs and kwargs["act"] != "silu_and_mul":
        with pytest.raises(ValueError, match=match):  # linear names it too, on every device
            linear(x, Z(4, 8), act=kwargs["act"])


@pytest.mark.parametrize("rows", [1, 3])
def test_rms_norm_linear_on_the_cpu_is_the_separate_kernels(rows):
    """Off the GPU: rms_norm (the residual updated in place and returned), then F.linear; no residual:
    the stream is x."""
    x, w, b = torch.randn(rows, 33), torch.randn(70, 33), torch.randn(70)
    norm_weight, residual = torch.rand(33) + 0.5, torch.randn(rows, 33)
    want_normed, want_stream = rms_norm_ref(x, norm_weight, 1e-5, residual.clone())
    y, stream = rms_norm_linear(x, norm_weight, 1e-5, w, b, residual)
    assert stream is residual and torch.equal(stream, want_stream)
    assert torch.equal(y, F.linear(want_normed, w, b))
    y, stream = rms_norm_linear(x, norm_weight, 1e-5, w)
    assert stream is x and torch.equal(y, F.linear(rms_norm_ref(x, norm_weight, 1e-5), w))
    assert torch.equal(
        linear(torch.cat([x, x], 1), w, act="silu_and_mul"),
        F.linear(silu_and_mul_ref(torch.cat([x, x], 1)), w),
    )


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

    def time(run, weights):
        # run: partial(gemv._separate, x, ...) or partial(gemv_triton, x, block_n=..., ...), by weight=
        kw = run.keywords
        knobs = None
        if run.func is gemv.gemv_triton:
            knobs = (kw["block_n"], kw["block_k"], kw["num_warps"], kw["num_stages"])
        timed.append(knobs)
        run(weight=weights[0])
        return times.get(knobs, 20.0)

    monkeypatch.setattr(gemv, "MEASURED_ON", ("cpu",))
    monkeypatch.setattr(gemv, "_time", time)
    monkeypatch.setattr(gemv, "_cold_weights", lambda weight: [weight])
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
    assert gemv._choices == {(None, 70, 300, torch.float32, True, x.device): fitting[-1]}
    assert gemv.gemv_choices() == {"70x300": fitting[-1]}  # the record benchmark rows keep
    # another key (no bias) is measured on its own; two rows are never measured
    linear(x, w)
    linear(torch.randn(2, 300), w, b)
    assert len(timed) == 2 * (1 + len(fitting)) and len(gemv._choices) == 2


def test_linear_keeps_f_linear_where_it_is_faster(fake_gpu, monkeypatch):
    timed, _, _ = fake_gpu
    x, w, _ = operands(33, 17, torch.float32, "cpu", False)
    linear(x, w)
    assert gemv._choices[(None, 33, 17, torch.float32, False, x.device)] is None
    assert gemv.gemv_choices()["33x17"] == "cublas"
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
    # the norms ride in the q/k/v and gate/up products, SwiGLU's activation in the down projection's
    # (each prologue's product alone too: the separate kernels' side of its race)
    # (layer 0's input norm has no residual to add: a key of its own)
    fused = {
        ("rms_norm", (q + 2 * kv) * d, h),
        ("add_rms_norm", (q + 2 * kv) * d, h),
        ("add_rms_norm", 2 * i, h),
        ("silu_and_mul", h, i),
    }
    plain = {(None, n, k) for _, n, k in fused} | {(None, h, q * d), (None, config.vocab_size, h)}
    assert {key[:3] for key in gemv._choices} == fused | plain
    assert events == [len(gemv._choices)]  # all measured before the peak was reset


def test_gemv_reads_a_weight_with_strided_rows():
    """Rows of the weight further apart than K (a slice of a wider matrix): stride(0) is the kernel's."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("runs Triton: a GPU or the interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wide = torch.randn(33, 150, device=device)
    x, w = torch.randn(1, 100, device=device), wide[:, :100]
    assert w.stride(0) == 150
    torch.testing.assert_close(gemv_triton(x, w, None, 8, 64, 4, 2), x @ w.T, atol=1e-4, rtol=1e-4)


def test_the_prologues_are_measured_apart_and_the_residual_is_safe(fake_gpu):
    """A product with a prologue has its own key; timing the separate kernels (which add x into the
    residual in place) leaves the caller's residual as it was; the fused kernel's answer is the separate
    kernels' (to rounding), with the stream in a new tensor."""
    timed, times, _ = fake_gpu
    x, w, b = operands(70, 64, torch.float32, "cpu", True)
    norm_weight, residual = norm_operands(64, torch.float32, "cpu")
    before = residual.clone()
    times.update({kn: 1.0 for kn in gemv.GEMV_KNOBS})  # the fused kernel wins everywhere
    y, stream = rms_norm_linear(x, norm_weight, 1e-5, w, b, residual)
    assert timed and timed[0] is None  # the separate kernels were timed first ...
    assert torch.equal(residual, before)  # ... on a copy of the residual, and the kernel ran
    normed, want_stream = rms_norm_ref(x, norm_weight, 1e-5, before.clone())
    torch.testing.assert_close(stream, want_stream)
    torch.testing.assert_close(y, F.linear(normed, w, b), atol=1e-4, rtol=1e-4)
    gate_up = torch.randn(1, 2 * 64)
    want = F.linear(silu_and_mul_ref(gate_up), w[:, :64].contiguous())
    got = linear(gate_up, w[:, :64].contiguous(), act="silu_and_mul")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert {key[0] for key in gemv._choices} == {"add_rms_norm", "silu_and_mul", None}
    measured = len(timed)
    rms_norm_linear(x, norm_weight, 1e-5, w, b, residual)
    assert len(timed) == measured


def test_use_gemv_without_prologues_keeps_the_separate_kernels(fake_gpu):
    """use_gemv(True, prologues=False): the norm and the activation run on their own, and the product
    alone is raced (7.3.2 without 7.3.3)."""
    timed, times, _ = fake_gpu
    x, w, _ = operands(70, 64, torch.float32, "cpu", False)
    norm_weight, residual = norm_operands(64, torch.float32, "cpu")
    times.update({kn: 1.0 for kn in gemv.GEMV_KNOBS})
    try:
        gemv.use_gemv(True, prologues=False)
        want_normed, want_stream = rms_norm_ref(x, norm_weight, 1e-5, residual.clone())
        y, stream = rms_norm_linear(x, norm_weight, 1e-5, w, None, residual)
        assert stream is residual and torch.equal(stream, want_stream)  # rms_norm's, in place
        torch.testing.assert_close(y, F.linear(want_normed, w), atol=1e-4, rtol=1e-4)
        assert [key[0] for key in gemv._choices] == [None]
    finally:
        gemv.use_gemv(True)


def test_cold_weights_pass_twice_the_l2_cache(monkeypatch):
    """The choice is timed over copies of the weight that pass twice the L2 cache (256 at most), as a
    decode step reads it: from memory."""
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=1000)
    )
    small, large = torch.zeros(10, 10), torch.zeros(100, 100)  # 400 and 40,000 bytes
    copies = gemv._cold_weights(small)
    assert len(copies) == 5 and copies[0] is small
    assert all(c.data_ptr() != small.data_ptr() and torch.equal(c, small) for c in copies[1:])
    assert gemv._cold_weights(large) == [large]
    assert len(gemv._cold_weights(torch.zeros(1))) == 256


def test_a_norm_with_a_residual_is_measured_apart(fake_gpu):
    """Layer 0's input norm (no residual) and the others' (a residual to read, a stream to write) are two
    keys: a choice measured on the first is not reused for the second. A weight without rows: the
    separate kernels, nothing measured."""
    timed, _, _ = fake_gpu
    x, w, _ = operands(70, 64, torch.float32, "cpu", False)
    norm_weight, residual = norm_operands(64, torch.float32, "cpu")
    rms_norm_linear(x, norm_weight, 1e-5, w)
    rms_norm_linear(x, norm_weight, 1e-5, w, None, residual)
    assert {key[0] for key in gemv._choices} == {"rms_norm", "add_rms_norm", None}
    measured = len(timed)
    assert rms_norm_linear(x, norm_weight, 1e-5, torch.zeros(0, 64))[0].shape == (1, 0)
    assert len(timed) == measured
