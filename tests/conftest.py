"""Fixtures shared by test files: the built book (one build per session) and one-thread torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    jb = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
    run = subprocess.run(
        [jb, "build", str(ROOT), "--path-output", str(out), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def one_thread():
    """Small models on the CPU: one thread decodes as fast as two, and a run does not stall when other
    processes share the cores (measured on the 2-core CI machine). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct on the CPU in float32 (the same greedy text on every device),
    loaded once per session for every test file that needs it."""
    from mini_infer.llm import LLM

    return LLM(dtype="float32", device="cpu", max_model_len=512, cpu_kv_bytes=64 << 20)


@pytest.fixture(scope="session")
def hf_smol():
    """Hugging Face transformers' model on the embedded GGUF's weights, in float32 on the CPU, loaded once
    per session. Like ignore_eos, its generate runs on past <|im_end|>, logits untouched."""
    import transformers

    from mini_infer.loader import embedded_gguf_path

    path = embedded_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf
