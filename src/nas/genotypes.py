"""The DARTS search space's names (`PRIMITIVES`) and its result, a `Genotype`.

A genotype describes the two cell types of a DARTS network (Liu et al. 2019): the *normal* cell
(keeps resolution) and the *reduction* cell (halves it). A cell has two inputs (nodes 0 and 1: the
outputs of the two previous cells) and `steps` intermediate nodes; node i (counting from 2) sums two
edges, each `(op_name, input_node)` with an input among the nodes before it. The cell's output
concatenates the nodes in `*_concat`.

Genotypes are data: they round-trip through JSON (`to_json`/`from_json`) and through the string form
the DARTS code prints (`to_string`/`parse_string`, parsed with `ast`, never `eval`), and
`parse_genotype` reads whatever a user passes as `model.net.genotype`: a name from
`NAMED_GENOTYPES`, a JSON file (e.g. the `genotype.json` of a search run) or a string. Anything
malformed ends in one `AutoclsError` sentence.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.utils.errors import AutoclsError

# The candidate operations of the DARTS space, in the order of the architecture weights' columns.
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

Edge = tuple[str, int]
CELL_KEYS = ("normal", "normal_concat", "reduce", "reduce_concat")

_HOW_TO = (
    "give a named genotype ({names}), a JSON file written by a search (genotype.json), or a string like "
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ...], normal_concat=[2, 3, 4, 5], "
    "reduce=[...], reduce_concat=[2, 3, 4, 5])"
)


class GenotypeError(AutoclsError):
    """A genotype that cannot be read or is not in the search space; `reason` says why."""

    def __init__(self, reason: str, origin: str | None = None):
        self.reason, self.origin = reason, origin
        names = ", ".join(NAMED_GENOTYPES) if "NAMED_GENOTYPES" in globals() else "DARTS_V2"
        where = f" ({origin})" if origin else ""
        super().__init__(f"Invalid genotype{where}: {reason}; {_HOW_TO.format(names=names)}.")


@dataclass(frozen=True)
class Genotype:
    """Both cells of a DARTS network; see the module docstring. Lists are accepted and stored as
    tuples, so a genotype is hashable (a population can be a set) and compares by value."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("normal", "reduce"):
            edges = _check_edges(name, getattr(self, name))
            concat = _check_concat(f"{name}_concat", getattr(self, f"{name}_concat"), len(edges) // 2)
            object.__setattr__(self, name, edges)
            object.__setattr__(self, f"{name}_concat", concat)

    @property
    def steps(self) -> int:
        """Intermediate nodes of the normal cell (DARTS uses 4, and the same for both cells)."""
        return len(self.normal) // 2

    def cell(self, reduction: bool) -> tuple[tuple[Edge, ...], tuple[int, ...]]:
        """(edges, concat) of the reduction or the normal cell."""
        return (self.reduce, self.reduce_concat) if reduction else (self.normal, self.normal_concat)

    def canonical(self) -> Genotype:
        """The same architecture with each node's two edges in sorted order: a node sums its edges, so
        their order does not matter, and canonical genotypes compare (and hash) by architecture."""

        def sort_nodes(edges: tuple[Edge, ...]) -> list[Edge]:
            return [edge for i in range(0, len(edges), 2) for edge in sorted(edges[i : i + 2], key=lambda e: (e[1], e[0]))]

        return Genotype(sort_nodes(self.normal), self.normal_concat, sort_nodes(self.reduce), self.reduce_concat)

    # --- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, list]:
        return {
            "normal": [list(edge) for edge in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(edge) for edge in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Genotype:
        if not isinstance(data, Mapping):
            raise GenotypeError(f"expected an object with keys {', '.join(CELL_KEYS)}, got {type(data).__name__}")
        missing = [k for k in CELL_KEYS if k not in data]
        unknown = [str(k) for k in data if k not in CELL_KEYS]
        if missing or unknown:
            problem = f"missing key(s) {', '.join(missing)}" if missing else f"unknown key(s) {', '.join(unknown)}"
            raise GenotypeError(f"{problem}; a genotype has exactly the keys {', '.join(CELL_KEYS)}")
        return cls(**{k: data[k] for k in CELL_KEYS})

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise GenotypeError(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        return cls.from_dict(data)

    # --- the DARTS string form -----------------------------------------------------------------
    def to_string(self) -> str:
        """`Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[2, 3, 4, 5], reduce=[...], ...)`:
        what the DARTS code prints and its genotypes.py holds, so genotypes can be copied across."""

        def edges(cell: tuple[Edge, ...]) -> str:
            return "[" + ", ".join(f"({op!r}, {j})" for op, j in cell) + "]"

        return (
            f"Genotype(normal={edges(self.normal)}, normal_concat={list(self.normal_concat)}, "
            f"reduce={edges(self.reduce)}, reduce_concat={list(self.reduce_concat)})"
        )

    @classmethod
    def parse_string(cls, text: str) -> Genotype:
        """The inverse of `to_string`; also reads the DARTS form with `range(2, 6)` concats, namedtuple
        positional arguments and a module prefix (`genotypes.Genotype(...)`). Only literals are read
        (`ast.literal_eval`); nothing in the string is executed."""
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as err:
            raise GenotypeError(f"malformed string: {err.msg}") from None
        call = tree.body
        func = call.func if isinstance(call, ast.Call) else None
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name != "Genotype":
            raise GenotypeError("malformed string: expected Genotype(normal=..., normal_concat=..., reduce=..., reduce_concat=...)")
        if len(call.args) > len(CELL_KEYS):
            raise GenotypeError(f"malformed string: {len(call.args)} positional values for {len(CELL_KEYS)} fields")
        values: dict[str, Any] = dict(zip(CELL_KEYS, (_literal(arg) for arg in call.args)))
        for keyword in call.keywords:
            if keyword.arg is None or keyword.arg in values:
                raise GenotypeError(f"malformed string: field {keyword.arg or '**'} given twice or unpacked")
            values[keyword.arg] = _literal(keyword.value)
        return cls.from_dict(values)

    def __str__(self) -> str:
        return self.to_string()


def _literal(node: ast.expr) -> Any:
    """A literal (lists, tuples, strings, ints) or `range(a, b)`, the one call DARTS prints."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" and not node.keywords:
        args = [_literal(arg) for arg in node.args]
        if not 1 <= len(args) <= 3 or not all(isinstance(a, int) for a in args):
            raise GenotypeError("malformed string: range() takes 1 to 3 integers")
        return list(range(*args))
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise GenotypeError(f"malformed string: {ast.unparse(node)[:60]!r} is not a literal") from None


def _check_edges(name: str, edges: Any) -> tuple[Edge, ...]:
    if isinstance(edges, (str, bytes)) or not isinstance(edges, Sequence) or not edges:
        raise GenotypeError(f"{name} must be a non-empty list of (op, input) pairs")
    if len(edges) % 2:
        raise GenotypeError(f"{name} has {len(edges)} edges, but every node takes exactly two")
    out = []
    for index, edge in enumerate(edges):
        if isinstance(edge, (str, bytes)) or not isinstance(edge, Sequence) or len(edge) != 2:
            raise GenotypeError(f"{name} edge {index} is {edge!r}, not an (op, input) pair")
        op, source = edge
        if op not in PRIMITIVES or op == "none":
            ops = ", ".join(p for p in PRIMITIVES if p != "none")
            raise GenotypeError(f"{name} edge {index} uses op {op!r}, which is not in the DARTS search space ({ops})")
        node = index // 2  # intermediate node 0 is the cell's node 2
        if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < node + 2:
            raise GenotypeError(
                f"{name} edge {index} reads node {source!r}, but node {node + 2} can only read nodes 0 to {node + 1}"
            )
        out.append((str(op), int(source)))
    return tuple(out)


def _check_concat(name: str, concat: Any, steps: int) -> tuple[int, ...]:
    if isinstance(concat, (str, bytes)) or not isinstance(concat, (Sequence, range)) or not concat:
        raise GenotypeError(f"{name} must be a non-empty list of node indices")
    out = []
    for node in concat:
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < steps + 2:
            raise GenotypeError(f"{name} names node {node!r}, but the cell has nodes 0 to {steps + 1}")
        out.append(int(node))
    if len(set(out)) != len(out):
        raise GenotypeError(f"{name} names a node twice")
    return tuple(out)


# --- published genotypes (data) -------------------------------------------------------------------
# Copied as data from the papers' code releases: quark0/darts cnn/genotypes.py (DARTS_V1: first order,
# DARTS_V2: second order, the paper's 2.76% CIFAR-10 cell) and yuhuixu1993/PC-DARTS (its CIFAR cell).
NAMED_GENOTYPES: dict[str, Genotype] = {
    "DARTS_V1": Genotype.parse_string(
        "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), "
        "('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], "
        "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), "
        "('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])"
    ),
    "DARTS_V2": Genotype.parse_string(
        "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
        "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
        "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), "
        "('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
    ),
    "PC_DARTS": Genotype.parse_string(
        "Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), ('dil_conv_3x3', 1), "
        "('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)], normal_concat=range(2, 6), "
        "reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), "
        "('sep_conv_3x3', 0), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], reduce_concat=range(2, 6))"
    ),
}


def parse_genotype(spec: Any, origin: str | None = None) -> Genotype:
    """A `Genotype` from what a user passes as `model.net.genotype`: a Genotype, a name in
    `NAMED_GENOTYPES`, a path to a JSON (or string-form) file, a JSON object string, the DARTS string
    form, or a mapping with the four keys (a YAML block). `origin` names the input in errors."""
    if isinstance(spec, Genotype):
        return spec
    if isinstance(spec, Mapping):
        return _reraise(lambda: Genotype.from_dict(dict(spec)), origin)
    if not isinstance(spec, str):
        raise GenotypeError(f"expected a name, a file or a string, got a {type(spec).__name__}", origin)
    text = spec.strip()
    if text in NAMED_GENOTYPES:
        return NAMED_GENOTYPES[text]
    if text.startswith("{"):
        return _reraise(lambda: Genotype.from_json(text), origin)
    if "(" in text:
        return _reraise(lambda: Genotype.parse_string(text), origin)
    path = Path(text).expanduser()
    if _is_file(path):
        content = path.read_text(encoding="utf-8", errors="replace").strip()
        read = Genotype.from_json if content.startswith("{") else Genotype.parse_string
        return _reraise(lambda: read(content), origin or f"file {path}")
    raise GenotypeError(f"{text!r} is neither a named genotype, an existing file nor a genotype string", origin)


def _reraise(read, origin: str | None) -> Genotype:
    try:
        return read()
    except GenotypeError as err:
        raise GenotypeError(err.reason, origin) from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # e.g. a name too long for the file system: not a file then
        return False
