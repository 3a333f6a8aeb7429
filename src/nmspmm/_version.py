"""The package version, in one place (setuptools reads it for the wheel, the CLI for --version)."""

__version__ = "0.1.0"
