"""Metrics, lag, GPU memory, health and its HTTP server, logging and redaction; implements
the pipeline's observer port (:class:`worker.pipeline.observer.Observer`)."""
