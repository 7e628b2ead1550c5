"""MQSA-TED recommendation service: the ``mqsa`` command lives in ``mqsa.cli``."""

__version__ = "0.1.0"
