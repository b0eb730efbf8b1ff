"""Low-rank task experts: layers, injection into any nn.Module, routing, merge and extract.

This package holds the core only: no training, data or CLI code.
"""

from .adapters import base_fingerprint, list_adapters, load_adapter, read_adapter, save_adapter, save_adapters
from .io import build_architecture, load_expert, load_student, read_card, save_expert, save_student
from .layers import ExpertLayer, TaskBatchNorm
from .model import ExpertModel, ExpertSummary, add_experts
from .optim import keep_absent_experts
from .routing import TaskRouting, active_routing, check_weights, route, routing_scope, top_k_weights

__all__ = [
    "ExpertLayer", "ExpertModel", "ExpertSummary", "TaskBatchNorm", "TaskRouting",
    "active_routing", "add_experts", "base_fingerprint", "list_adapters", "load_adapter", "read_adapter",
    "save_adapter", "save_adapters", "build_architecture", "keep_absent_experts", "load_expert", "load_student", "read_card",
    "route", "routing_scope", "save_expert", "save_student", "check_weights", "top_k_weights",
]
