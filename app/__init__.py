"""The Gradio UI of the Adapter Workbench: one module per tab, plotly charts, the block diagram.

``app.ui.build_demo(service)`` builds the page; ``app.py`` at the repository root builds it on the
default ``jobs.service.JobService``, starts the worker thread and launches it.
"""
