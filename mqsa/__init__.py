"""MQSA-TED recommendation service: one import name for the whole project.

    mqsa.models     the network (models/)
    mqsa.training   data, trainer, evaluation, export (training/)
    mqsa.service    the FastAPI app (service/)
    mqsa.cli        the ``mqsa`` command; mqsa.errors the user-facing errors

The folders keep the names the design gives them; ``pyproject.toml`` maps them
under ``mqsa`` when the project is installed (``pip install -e .`` included).
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "mqsa-ted"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
