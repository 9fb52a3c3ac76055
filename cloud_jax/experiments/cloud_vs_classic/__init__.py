"""CLoud against a classic reward model, end to end (``python -m cloud_jax pipeline``).

    config.py       PipelineConfig (a training config plus the pipeline's sections), loading it
    run.py          the stages in order, skipping finished ones: run_pipeline
    diagnostics.py  the model's critiques against the oracle's (verdicts, pairs, exact matches)
    report.py       report.md and the terminal summary
"""
