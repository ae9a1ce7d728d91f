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
