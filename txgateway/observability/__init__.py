"""Seeing what the gateway does: metrics, access log, tracing."""
