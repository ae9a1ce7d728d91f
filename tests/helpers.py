"""Checks shared by test files (importable from tests: pytest puts this folder on sys.path)."""

import time


def assert_engine_quiet(llm, within: float = 0.0) -> None:
    """Nothing queued or running and every KV block free, now or, for a server whose engine thread is
    still finishing, within `within` seconds."""
    engine = llm.engine
    blocks = engine.scheduler.block_manager
    deadline = time.monotonic() + within
    while engine.has_unfinished_requests() or blocks.num_free_blocks != blocks.num_blocks:
        assert time.monotonic() < deadline, (
            f"engine not quiet: {len(engine.scheduler.waiting)} waiting, "
            f"{len(engine.scheduler.running)} running, "
            f"{blocks.num_free_blocks} of {blocks.num_blocks} blocks free"
        )
        time.sleep(0.02)


TINY_HF = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


# A config.json of the same shape for Mini-Infer's dummy weights (load_format="dummy"), vocabulary 256
TINY_DUMMY = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)


def tiny_hf_model(model_type: str, **config):
    """A tiny random Hugging Face model of one family (TINY_HF's shape, updated by `config`), in float32.
    Its norms and biases are drawn from [0.5, 1.5], so that a mistake with them shows in the logits."""
    import torch
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[model_type]
    torch.manual_seed(0)
    model = model_class(config_class(**{**TINY_HF, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model.eval()
