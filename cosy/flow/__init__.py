"""Conditional flow-matching decoder (speech tokens -> mel)."""

from cosy.flow.model import FlowConfig, FlowModel, FlowStream

__all__ = ["FlowConfig", "FlowModel", "FlowStream"]
