"""The in-pod half of ascend: load a pickled call, run it, publish its result once.

See :mod:`ascend_runner.protocol` for the contract with the client.
"""

__version__ = "0.1.0"
