"""txgateway: an API gateway on Twisted."""

__version__ = "0.1.0"
