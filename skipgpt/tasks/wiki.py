"""Data loading and scoring for the `skipgpt_wiki` lm-eval tasks (referenced from their YAML).

lm-eval imports this file by path, not as `skipgpt.tasks.wiki`, so it uses absolute imports.
"""
from __future__ import annotations

import re


def load_splits(max_docs: int | None = None, max_chars: int | None = None, cache_dir: str | None = None, **_):
    """The train/validation/test splits as `datasets.Dataset`s (lm-eval's `custom_dataset` hook).

    lm-eval passes the task's metadata and dataset_kwargs as keyword arguments; unknown ones
    (such as `version`) are ignored. `max_docs` keeps the first articles of each split and
    `max_chars` cuts each article at the last space before that many characters.
    """
    import datasets

    from skipgpt.assets import WIKI_SPLITS, read_wiki_split

    splits = {}
    for split in WIKI_SPLITS:
        docs = read_wiki_split(split, cache_dir)[:max_docs]
        if max_chars:
            docs = [{**d, "page": _cut(d["page"], max_chars)} for d in docs]
        splits[split] = datasets.Dataset.from_list(docs)
    return datasets.DatasetDict(splits)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    # Cut between words, so the word count stays honest.
    return head[: max(head.rfind(" "), head.rfind("\n"))].rstrip() or head


def doc_to_target(doc: dict) -> str:
    # The raw article: unlike wikitext's, this text was never word-tokenized, so there is
    # nothing to detokenize.
    return doc["page"]


def process_results(doc: dict, results) -> dict:
    """Per-article (log-likelihood, weight) pairs; lm-eval's perplexity aggregations sum both."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"].strip()))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
