"""RULER-style synthetic long-context tasks: offline generators, string-match scoring, a model runner."""
from sala.eval.runner import format_table, parse_lengths, run_tasks
from sala.eval.scoring import string_match_all, string_match_part
from sala.eval.tasks import TASKS, TaskSample, generate, read_jsonl, write_jsonl

__all__ = ["TASKS", "TaskSample", "generate", "read_jsonl", "write_jsonl", "string_match_all", "string_match_part",
           "run_tasks", "format_table", "parse_lengths"]
