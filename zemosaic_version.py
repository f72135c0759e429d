"""The version of ZeMosaic (the package's, the files' ZMVERS, the run report's)."""

__version__ = "0.1.0"
