"""lm-eval tasks shipped with skipgpt, for offline evaluation.

- `skipgpt_wiki`: held-out English Wikipedia articles (the test split written by
  `skipgpt setup --data`), scored like lm-eval's `wikitext`: rolling log-likelihood over each
  whole article, reported as word_perplexity, byte_perplexity and bits_per_byte.
- `skipgpt_wiki_tiny`: the first 5 of those articles, cut to 2000 characters: a smoke test
  that runs in seconds.

lm-eval finds them through its include path:

    from lm_eval.tasks import TaskManager
    TaskManager(include_path=skipgpt.tasks.task_dir())

or `lm_eval --include_path $(python -c "import skipgpt.tasks as t; print(t.task_dir())")`.
The data location is resolved when a task loads (SKIPGPT_CACHE, else ~/.cache/skipgpt), or
passed as `--metadata '{"cache_dir": "DIR"}'`.
"""
from __future__ import annotations

from pathlib import Path

TASKS = ("skipgpt_wiki", "skipgpt_wiki_tiny")


def task_dir() -> str:
    """The directory holding the task YAML files: lm-eval's `include_path`."""
    return str(Path(__file__).resolve().parent)
