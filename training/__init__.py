"""Offline training: datasets, the stage loop, push, prune, evaluation, export, the CLI.

Run ``python -m training --help``. Imports protopnet and model_store; nothing in
protopnet, model_store or service imports this package.
"""
