"""Tokenizer work (chat templates, encoding) off the event loop, in one worker thread.

One thread: requests were tokenized one at a time on the event loop before, and a Hugging Face
fast tokenizer shared by concurrent threads can fail ("Already borrowed") when one call changes
its truncation settings. The caller's context (its request id, for log lines) goes along.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxserve-tokenize")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the tokenizer thread, awaited without blocking the event loop."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(ctx.run, fn, *args))
