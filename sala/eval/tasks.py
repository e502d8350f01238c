"""The RULER-style synthetic tasks, as evaluation uses them. They live in `sala.data.synthetic`, where data
preparation (which mixes them into training corpora) can use them too without importing evaluation code."""
from sala.data.synthetic import MAX_NEW_TOKENS, TASKS, TaskSample, generate, multiquery_keys, read_jsonl, write_jsonl

__all__ = ["MAX_NEW_TOKENS", "TASKS", "TaskSample", "generate", "multiquery_keys", "read_jsonl", "write_jsonl"]
