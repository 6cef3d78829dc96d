"""The shape of the code, checked: no import cycle between files or between folders (only the command-line modules
import upward), sampling and speculative decoding in ``generate/``, the model's narrow interface."""

import ast
import collections
import inspect
from pathlib import Path

import gptlab
from gptlab.model import GPT

SRC = Path(gptlab.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(("gptlab", *p.relative_to(SRC).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the gptlab modules it imports (at the top or inside a function)."""
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                subs = {f"{target}.{a.name}" for a in node.names} & mods.keys()
                edges[m] |= subs
                if len(subs) < len(node.names) and target in mods:
                    edges[m].add(target)
            elif isinstance(node, ast.Import):
                edges[m] |= {a.name for a in node.names} & mods.keys()
        edges[m].discard(m)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def is_cli(m: str) -> bool:
    return m.endswith((".cli", ".__main__")) or m == "gptlab"


def test_no_import_cycle_between_files():
    mods = modules()
    assert cycles(imports(mods)) == []


def test_no_import_cycle_between_folders_except_from_the_command_line():
    """Each sub-package is one node, each top-level module another; the command-line modules (and the lazy
    package entry point) may import anything."""
    mods = modules()

    def node(m: str) -> str:
        parts = m.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and mods[m].name == "__init__.py") else m

    folders: dict[str, set[str]] = collections.defaultdict(set)
    for m, targets in imports(mods).items():
        if not is_cli(m):
            folders[node(m)] |= {node(t) for t in targets} - {node(m)}
    assert cycles(folders) == []
    # the graph is the real one: serve builds on generate, never the other way
    assert "generate" in folders["serve"] and "serve" not in folders["generate"]


def test_sampling_and_speculative_decoding_live_in_generate_and_quant_keeps_quantization():
    quant = {p.stem for p in (SRC / "quant").glob("*.py")}
    assert "speculative" not in quant
    assert {"sampling", "speculative", "engine"} <= {p.stem for p in (SRC / "generate").glob("*.py")}
    quant_imports = {t for m, ts in imports(modules()).items() if m.startswith("gptlab.quant") for t in ts}
    assert not any(t.startswith("gptlab.generate") for t in quant_imports)


def test_the_model_has_a_narrow_interface():
    """gpt-fast's shape: forward(idx, targets) for training and scoring (with its inputs: images, packed
    documents), named methods for the rest."""
    params = list(inspect.signature(GPT.forward).parameters)
    assert params[:3] == ["self", "idx", "targets"]
    assert set(params[3:]) == {"images", "doc_ids"}
    assert all(inspect.signature(GPT.forward).parameters[p].kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])
    for method in ("hidden_states", "logits", "loss", "decode", "extend_vocab"):
        assert callable(getattr(GPT, method))
