"""FOD Inspector: visual anomaly detection with Focus-the-Discrepancy (ICCV 2023).

The engine (everything importable from this package without Streamlit) flows:
images -> ``data`` -> ``backbone`` features -> ``model`` (FOD) -> ``training`` / ``scoring``
-> ``bundle`` on disk -> ``cli`` and the Streamlit ``pages/`` as thin shells.
"""

__version__ = "0.1.0"
