"""The MQSA-TED network."""

from mqsa.models.mqsa import MQSA, MQSAConfig

__all__ = ["MQSA", "MQSAConfig"]
