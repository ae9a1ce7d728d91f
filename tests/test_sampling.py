"""The one-pass sampling kernel against its PyTorch reference: greedy rows are the exact argmax, sampled
rows follow softmax(logits / T), and a seed fixes the draw; the Sampler's allowed_token_ids and
logit_bias against a reference. Runs the Triton kernel under the interpreter on the CPU (small
vocabularies) and for real on a GPU."""

import pytest
import torch

import mini_infer.kernels  # noqa: F401  (switches on the Triton interpreter when there is no GPU)
from mini_infer.kernels.sampling import sample_parts, sample_ref, sample_triton
from mini_infer.layers.sampler import Sampler, SamplingBatch
from mini_infer.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sample_split(logits, temperature, seeds):
    """The kernel with every row shared by three programs (and small blocks, so that short rows split)."""
    return sample_triton(logits, temperature, seeds, num_parts=3, block=256)


IMPLEMENTATIONS = [sample_ref, sample_triton, sample_split]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "rows, vocab, dtype",
    [
        (1, 7, torch.float32),
        (5, 3000, torch.float32),
        (4, 4099, torch.bfloat16),
        (3, 2048, torch.float16),
    ],
)
def test_temperature_zero_is_the_exact_argmax(impl, rows, vocab, dtype):
    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).to(dtype)
    seeds = torch.randint(0, 2**62, (rows,), device=DEVICE)
    out = impl(logits, torch.zeros(rows, device=DEVICE), seeds)
    assert out.tolist() == logits.float().argmax(dim=-1).tolist()


# (the split kernel draws what one pass draws: test_a_split_row_draws_what_one_pass_draws)
@pytest.mark.parametrize("impl", [sample_ref, sample_triton])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(impl, temperature):
    n = 20_000 if DEVICE == "cuda" else 500  # the interpreter takes milliseconds per row
    logits = torch.randn(6, device=DEVICE)
    expected = torch.softmax(logits / temperature, dim=-1).cpu()
    draws = impl(
        logits.repeat(n, 1),
        torch.full((n,), temperature, device=DEVICE),
        torch.randperm(2**20, device=DEVICE)[:n] * 4099 + 1,
    )
    freq = torch.bincount(draws.cpu(), minlength=6) / n
    assert (freq - expected).abs().max() < 4 * (expected * (1 - expected) / n).sqrt().max() + 1e-3


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_seed_fixes_the_draw_and_greedy_rows_ignore_it(impl):
    logits = torch.randn(8, 500, device=DEVICE)
    t = torch.tensor([0.0, 1.0] * 4, device=DEVICE)
    seeds = torch.tensor([11, 11, 12, 12, 13, 13, 14, 14], device=DEVICE)
    first, again = impl(logits, t, seeds), impl(logits, t, seeds)
    assert first.tolist() == again.tolist()
    others = impl(logits, t, seeds + 1000)
    assert others[0::2].tolist() == first[0::2].tolist() == logits[0::2].argmax(-1).tolist()
    # 4 rows of 500 tokens all equal by chance: ~never
    assert others[1::2].tolist() != first[1::2].tolist()


def test_filtered_tokens_are_never_drawn():
    logits = torch.randn(64, 300, device=DEVICE)
    logits[:, 100:] = float("-inf")  # what top-k / top-p leave behind
    draws = sample_triton(logits, torch.ones(64, device=DEVICE), torch.arange(64, device=DEVICE))
    assert draws.max() < 100


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_warm_up_draws_from_logits_of_either_dtype(device):
    # the engine's start-up: the model's dtype and float32 (on the GPU, the kernel built for each)
    logits = torch.randn(3, 50, device=device)
    for x in (logits.to(torch.bfloat16 if device == "cuda" else torch.float32), logits.softmax(-1)):
        assert Sampler.warm_up(x) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_split_row_draws_what_one_pass_draws(dtype):
    """Each column's noise comes from its own number, and the parts' bests are combined lowest column first on
    ties: any split gives the one-pass draw, sampled or greedy, ties and -inf columns included."""
    logits = (torch.randn(4, 3001, device=DEVICE) * 3).to(dtype)
    logits[2, :] = 1.0  # all tied: the first column
    logits[3, :2000] = float("-inf")  # filtered
    t = torch.tensor([1.0, 0.0, 0.0, 2.0], device=DEVICE)  # row 2 greedy
    seeds = torch.tensor([5, 6, 7, 8], device=DEVICE)
    one = sample_triton(logits, t, seeds, num_parts=1)
    for parts, block in [(2, 2048), (5, 256), (12, 256)]:
        assert (
            sample_triton(logits, t, seeds, num_parts=parts, block=block).tolist() == one.tolist()
        )
    assert one[2] == 0 and one[3] >= 2000


def test_sample_parts_splits_rows_only_when_the_batch_is_small():
    assert (
        sample_parts(rows=1, vocab=128_256, block=2048, num_sms=132) == 63
    )  # every block its program
    assert sample_parts(rows=4, vocab=128_256, block=2048, num_sms=132) == 63
    assert sample_parts(rows=64, vocab=151_936, block=2048, num_sms=132) == 9
    assert sample_parts(rows=256, vocab=151_936, block=2048, num_sms=132) == 3
    assert sample_parts(rows=600, vocab=151_936, block=2048, num_sms=132) == 1
    assert sample_parts(rows=1, vocab=7, block=2048, num_sms=132) == 1


@pytest.mark.parametrize("rows, vocab", [(1, 50), (3, 1000), (4, 4099)])
def test_allowed_token_ids_and_logit_bias_act_before_the_draw_and_leave_logprobs_raw(rows, vocab):
    logits = torch.randn(rows, vocab, device=DEVICE) * 3
    allowed = torch.randperm(vocab)[:7].tolist()
    bias = dict(zip(torch.randperm(vocab)[:5].tolist(), (torch.randn(5) * 4).tolist()))
    # the reference: every other token at -inf, then the biases added
    ref = torch.full_like(logits, float("-inf"))
    ref[:, allowed] = logits[:, allowed]
    ref[:, list(bias)] += torch.tensor(list(bias.values()), device=DEVICE)
    biased = SamplingParams(temperature=0, allowed_token_ids=allowed, logit_bias=bias, logprobs=1)
    plain = SamplingParams(temperature=0)
    params = [biased] * (rows - 1) + [plain] if rows > 1 else [biased]
    batch = SamplingBatch(params, [9] * rows, [4] * rows, [None] * rows)
    out = Sampler()(logits, batch)
    want = [
        int(ref[i].argmax()) if p is biased else int(logits[i].argmax())
        for i, p in enumerate(params)
    ]
    assert out.token_ids.tolist() == want
    # log-probabilities are the model's, before the bias (vLLM's default)
    raw = logits.log_softmax(-1)
    for r, i in enumerate(out.logprob_rows):
        assert torch.allclose(out.logprobs[r, 0], raw[i, want[i]], atol=1e-5)
    # sampled at temperature 1, only allowed tokens come out
    hot = SamplingParams(temperature=1.0, allowed_token_ids=allowed[:3], logit_bias=bias)
    many = logits[:1].expand(64, vocab).contiguous()
    batch = SamplingBatch([hot] * 64, [9] * 64, [4] * 64, [None] * 64)
    assert set(Sampler(seed=0)(many, batch).token_ids.tolist()) <= set(allowed[:3])
