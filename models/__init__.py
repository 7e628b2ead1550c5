"""The MQSA-TED network."""

from models.mqsa import MQSA, MQSAConfig

__all__ = ["MQSA", "MQSAConfig"]
