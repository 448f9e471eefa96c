"""The simulator's parts (issue 16 pt 7): no import cycle between its modules, and the
control server does not import the server at all."""

from __future__ import annotations

import ast
from pathlib import Path

SIM = Path(__file__).resolve().parent.parent / "sim"


def runtime_imports(path: Path) -> set[str]:
    """sim modules ``path`` imports at run time (imports under ``if TYPE_CHECKING`` excluded)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sim."):
            found.add(node.module.split(".")[1])
    return found & {p.stem for p in SIM.glob("*.py")}


def test_no_import_cycle_between_sim_modules():
    graph = {p.stem: runtime_imports(p) for p in SIM.glob("*.py")}
    assert "control" in graph["server"]  # the server starts the control server ...
    assert "server" not in graph["control"]  # ... which does not import it back

    def visit(module: str, path: list[str]) -> None:
        for dep in graph.get(module, ()):
            assert dep not in path, f"import cycle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])


def test_every_request_type_has_a_handler():
    from sim import protocol as P
    from sim.server import SimServer

    requests = {parse(P.FieldReader(["0"] * 40, msg_id)).__class__.__name__
                for msg_id, parse in P._PARSERS.items() if msg_id not in (3,)}
    requests |= {"PlaceOrder", "Unsupported"}
    missing = sorted(name for name in requests if not hasattr(SimServer, f"on_{name}"))
    assert missing == []
