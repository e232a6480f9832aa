"""Benchmarks: taskq against a bare py-amqp floor and Celery, same broker, same contract.

Run ``python benchmarks/run.py`` (or ``--quick``); see README.md for what each number means.
"""
