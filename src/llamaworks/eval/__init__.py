"""Evaluation: multiple-choice benchmarks scored like lm-evaluation-harness, perplexity, reports.

    from llamaworks.eval import EvalSettings, run_eval, LoglikelihoodScorer, perplexity
    backend = TorchBackend.load(path, EngineOptions(max_rows=rows_for(tasks)), reference=True)  # or any Backend
    doc = run_eval(backend, None, settings)
"""

from .perplexity import PerplexityResult, perplexity
from .runner import LEADERBOARD, TASK_NAMES, EvalSettings, eval_main, load_tasks, rows_for, run_eval
from .scorer import ChoiceScore, LoglikelihoodScorer
from .task import Doc, FewshotSampler, Prompt, Task, build_prompt

__all__ = ["LEADERBOARD", "TASK_NAMES", "ChoiceScore", "Doc", "EvalSettings", "FewshotSampler",
           "LoglikelihoodScorer", "PerplexityResult", "Prompt", "Task", "build_prompt", "eval_main",
           "load_tasks", "perplexity", "rows_for", "run_eval"]
