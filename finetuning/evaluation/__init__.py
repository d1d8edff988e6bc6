"""Evaluation: generate speech per speaker, score it with pure metrics and loaded scorers, report the results."""
