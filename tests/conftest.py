"""Fixtures shared by test files (the built book, one build per session; one-thread torch; the embedded model
and Hugging Face's), and a `chapterN` mark on every test of chapter N: `pytest -m chapter4`."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The chapter whose code each test file checks (the chapter that exports the modules it tests). Files
# about the whole project (the book, the export, the README, lint, architecture) have none; a chapter's
# notebook (run by nbval) and its parametrized checks in test_chapters.py get their own chapter's mark.
CHAPTER_OF_TEST_FILE = {
    "test_llama.py": 1,
    "test_loader.py": 1,
    "test_rmsnorm.py": 2,
    "test_activation.py": 2,
    "test_rope.py": 3,
    "test_kv_cache.py": 4,
    "test_block_manager.py": 4,
    "test_attention_kernels.py": 4,
    "test_scheduler.py": 5,
    "test_engine.py": 6,
    "test_sampling.py": 6,
    "test_sampling_params.py": 6,
    "test_detokenizer.py": 6,
    "test_reliability.py": 6,
    "test_benchmarks.py": 7,
    "test_gemv.py": 7,
    "test_serve.py": 8,
    "test_tensor_parallel.py": 9,
    "test_spec_decode.py": 10,
}
CHAPTERS = len(list((ROOT / "chapters").glob("[0-9]*.py")))  # marks chapter1 ... chapterN


def pytest_configure(config):
    for n in range(1, CHAPTERS + 1):
        config.addinivalue_line("markers", f"chapter{n}: checks Chapter {n}'s code")


def chapter_of(item) -> int | None:
    """The chapter a collected test belongs to: by its notebook or chapter parameter, else by its file."""
    name = item.path.name
    if item.path.parent.name == "chapters" and (m := re.match(r"(\d+)_", name)):
        return int(m.group(1))
    param = getattr(item, "callspec", None) and item.callspec.params.get("py")
    if isinstance(param, Path) and (m := re.match(r"(\d+)_", param.name)):
        return int(m.group(1))
    return CHAPTER_OF_TEST_FILE.get(name)


def pytest_collection_modifyitems(items):
    for item in items:
        if (n := chapter_of(item)) is not None:
            item.add_marker(f"chapter{n}")


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
