"""Evaluation without Django: graders, text metrics and the statistics that summarise them.

- `llm.evals.templates`: `{{item.*}}` and `{{sample.*}}` placeholders, rendered per example;
- `llm.evals.graders`: OpenAI-shaped grader definitions, checked once and applied per example;
- `llm.evals.text`: the CJK-aware tokenizer and the similarity metrics built on it;
- `llm.evals.stats`: bootstrap intervals and label-task summaries.
"""
