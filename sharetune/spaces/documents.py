"""Spec documents read strictly: YAML text in, a plain tree of mappings, lists and scalars out.

PyYAML's safe loader keeps the last of two equal keys (silently dropping a block), recurses once per
level of nesting (a deep document ends in RecursionError), and shares an aliased node wherever it
is used, so a few lines of anchors expand to billions of nodes once the spec is copied or dumped.
`load_yaml` refuses all three, and bytes that are not UTF-8; `check_tree` holds a tree from any
source (a file, `--set`, a dict) to the same limits and to string keys. Both raise `SpecError`.
PyYAML reads YAML 1.1, where `1e12` is a string (a float needs a dot and a signed exponent);
`load_yaml` reads it as YAML 1.2 does, a number.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_DEPTH = 32  # levels of nesting (aliases expanded); the presets use 4
MAX_NODES = 100_000  # values once aliases are expanded; the largest preset has a few hundred
MAX_BYTES = 1_000_000  # a spec's text; the largest preset has a few kB, and /dev/zero never ends


class SpecError(ValueError):
    """A spec the user must fix; the message names the field and the allowed values."""


class StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys and nesting deeper than MAX_DEPTH while it composes."""

    def compose_node(self, parent, index):
        self.depth = getattr(self, "depth", 0) + 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self):
        document = super().compose_document()
        _measure(document, {}, 1)
        return document

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats that YAML 1.1 reads as strings: an exponent without a dot (1e12) or without a sign (1.5e3)
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


def _measure(node: yaml.Node, sizes: dict[int, int], level: int) -> int:
    """Values under `node` with aliases expanded (an aliased node is counted once per use, measured once)."""
    if level > MAX_DEPTH:
        raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels once aliases are expanded",
                                          node.start_mark)
    if id(node) not in sizes:
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = 1 + sum(_measure(child, sizes, level + 1) for child in children)
        if sizes[id(node)] > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES} values once aliases are expanded",
                                              node.start_mark)
    return sizes[id(node)]


def load_yaml(text: str | bytes, source: str, *, most_bytes: int | None = MAX_BYTES) -> Any:
    """The document in `text` (UTF-8 if bytes); `source` names it in the error (a file, `--set key`).
    What a user gives holds at most `most_bytes`; the spec a search saved for itself is read whatever
    its size (None: an earlier version wrote larger ones)."""
    if most_bytes is not None and len(text.encode() if isinstance(text, str) else text) > most_bytes:
        raise SpecError(f"{source}: larger than {most_bytes // 1_000_000} MB; a spec is a few kB")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SpecError(f"{source}: not UTF-8 text (byte {err.start} is {text[err.start:err.start + 1]!r}); "
                            "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: not valid YAML: {_one_line(err)}") from None
    except RecursionError:  # a flow collection nested past the recursion limit within one node
        raise SpecError(f"{source}: not valid YAML: nested deeper than {MAX_DEPTH} levels") from None


def _one_line(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{err.problem}{where}"
    return " ".join(str(err).split())


def check_tree(value: Any, path: str = "") -> None:
    """A spec tree must nest at most MAX_DEPTH levels, hold at most MAX_NODES values and key its
    mappings by strings (YAML reads `1:` as an integer key)."""
    count = 0

    def walk(item: Any, where: str, level: int) -> None:
        nonlocal count
        count += 1
        if level > MAX_DEPTH:
            raise SpecError(f"{re.split(r'[.[]', where)[0] or 'spec'}: nested deeper than {MAX_DEPTH} levels")
        if count > MAX_NODES:
            raise SpecError(f"{where or 'spec'}: more than {MAX_NODES} values")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise SpecError(f"{where or 'spec'}: key {key!r} is not a string; quote it: '{key}'")
                if not key.isprintable():
                    raise SpecError(f"{where or 'spec'}: key {key!r} is not a name (it holds control characters)")
                walk(child, f"{where}.{key}" if where else key, level + 1)
        elif isinstance(item, (list, tuple, set, frozenset)):
            for index, child in enumerate(item):
                walk(child, f"{where}[{index}]", level + 1)

    walk(value, path, 1)
