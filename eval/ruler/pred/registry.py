"""The method registry: one place that maps a ``--server_type`` to everything the harness needs of a method.

call_api.py, eval_sketchwalk.py, compare_results.py and the sweep driver ask it and never branch on a server
type. A method is a :class:`~eval.ruler.pred.servers.Server` (its name, help, own flags, how its knobs are
resolved and recorded, its checkpoint kind, how it is switched on in a loaded model); the built-in ones
(``hf``, ``SketchWalk``, ``SeerAttn``) are defined in eval/ruler/pred/servers.py and listed in
:data:`SERVERS` below.

Adding a method touches one new module and one line here: the module holds its block selector (a
:class:`sketch_walk.core.contract.BlockSelector`) and its ``Server``; the line in :data:`SERVERS` names it.
Every script then accepts ``--server_type NAME`` and its flags (docs/ARCHITECTURE.md, "Adding a method").
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any, Dict, List, Optional

from eval.ruler.pred.servers import Server
from sketch_walk.core.checkpoint import read_config_json
from sketch_walk.core.errors import UsageError

_SERVERS: Dict[str, Server] = {}


def _key(name: str) -> str:
    return (name or "").replace("_", "").replace("-", "").lower()


def register(server: Server) -> Server:
    """Add a method; its server type (and its checkpoint kind) must be new."""
    if _key(server.server_type) in _SERVERS:
        raise ValueError(f"server type {server.server_type!r} is registered already")
    if server.checkpoint and any(s.checkpoint == server.checkpoint for s in _SERVERS.values()):
        raise ValueError(f"checkpoint kind {server.checkpoint!r} is registered already")
    _SERVERS[_key(server.server_type)] = server
    return server


def unregister(server_type: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    _SERVERS.pop(_key(server_type), None)


def servers() -> List[Server]:
    """Every registered method, in registration order."""
    return list(_SERVERS.values())


def get(server_type: str) -> Server:
    """The method of a ``--server_type`` value (case, ``_`` and ``-`` ignored); UsageError naming the choices."""
    server = _SERVERS.get(_key(server_type))
    if server is None:
        raise UsageError(f"unknown --server_type {server_type!r}; choose one of "
                         f"{', '.join(s.server_type for s in _SERVERS.values())}")
    return server


def dense_names() -> set:
    """Server types and method names (lower case) of the methods that run dense attention."""
    return {n.lower() for s in _SERVERS.values() if not s.sparse for n in (s.server_type, s.method)}


def add_server_flags(parser: argparse.ArgumentParser, server_types: Optional[List[str]] = None) -> None:
    """One argparse group per method with flags (every method's, or those of ``server_types``)."""
    chosen = _SERVERS.values() if server_types is None else [get(t) for t in server_types]
    for server in chosen:
        if server.add_flags is not None:
            server.add_flags(parser.add_argument_group(f"{server.server_type} (--server_type {server.server_type})"))


def read_checkpoint(folder: str) -> Optional[Dict[str, Any]]:
    """The config.json of a method checkpoint folder (its ``"method"`` is a registered checkpoint kind), validated
    by that method; None for anything else (not a folder, no config.json, a Hugging Face model folder)."""
    data = read_config_json(folder)
    if not isinstance(data, dict):
        return None
    server = next((s for s in _SERVERS.values() if s.checkpoint and s.checkpoint == data.get("method")), None)
    if server is None:
        return None
    if server.check_checkpoint is not None:
        server.check_checkpoint(folder)
    return data


#: The methods, one line each: "module:attribute" of its Server, registered in this order.
SERVERS = (
    "eval.ruler.pred.servers:DENSE",
    "eval.ruler.pred.servers:SKETCH_WALK",
    "eval.ruler.pred.servers:SEER_ATTN",
)
for _entry in SERVERS:
    _module, _, _name = _entry.partition(":")
    register(getattr(importlib.import_module(_module), _name))
