"""Evaluation: suite (options, questions, text), answers (matching, n-grams, thinking), metrics
(the registry and the score), stats (bootstrap, verdicts), cache, records, runner (evaluate,
kl_divergence, compare) and report (comparison_table); docs/evaluation.md."""
