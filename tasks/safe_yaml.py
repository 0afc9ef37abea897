"""YAML read from users (config files, overrides, bundle files), with bounds.

PyYAML's pure-Python ``SafeLoader`` (plain data only: tags that build Python objects are refused), plus:

- aliases may add at most :data:`MAX_ALIAS_NODES` values to the document (a 575-byte "billion laughs" file
  otherwise expands to billions of values), and an alias may not refer to the value that contains it;
- a key given twice in one mapping is an error naming both lines (YAML would silently keep the second);
- nesting is at most :data:`MAX_DEPTH` levels (deeper input would exhaust Python's stack).

Every error is one :class:`YamlError` line naming the source and the line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: how many values aliases may add to a document (a configuration needs a few hundred at most)
MAX_ALIAS_NODES = 100_000
#: how deeply lists and mappings may nest (a configuration needs 5 or 6 levels)
MAX_DEPTH = 100
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlError(ValueError):
    """YAML text that cannot be loaded safely; the message names the source, the line and the fix."""


def clip(text: object, limit: int = 120) -> str:
    """``str(text)`` cut to ``limit`` characters (with an ellipsis): user text in error messages stays short."""
    s = str(text)
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that records where aliases are and refuses deep nesting while composing."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.name = source
        self.alias_marks: list[yaml.Mark] = []
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            self.alias_marks.append(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise YamlError(
                f"{self.name}: lists and mappings nest more than {MAX_DEPTH} levels deep (line {line}); "
                "a configuration needs a few levels: flatten it"
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _walk(root: Node) -> Iterator[tuple[Node, str]]:
    """Every distinct node once, with the dotted key path where it is first met."""
    seen: set[int] = set()
    stack: list[tuple[Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node, path
        if isinstance(node, MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, ScalarNode) else "?"
                stack.append((key, path))
                stack.append((value, f"{path}.{name}" if path else str(name)))
        else:
            stack.extend((child, path) for child in _children(node))


def _expanded_size(root: Node) -> int | None:
    """Values the document holds once every alias is expanded (capped), or None for a recursive alias."""
    cap = 10 * MAX_ALIAS_NODES + 1
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        if finished:
            sizes[nid] = min(cap, 1 + sum(sizes[id(c)] for c in _children(node)))
            open_.discard(nid)
            continue
        if nid in sizes:
            continue
        if nid in open_:  # met again below itself: an alias to a value that contains it
            return None
        open_.add(nid)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _check_graph(root: Node, loader: _BoundedLoader) -> None:
    """Refuse alias expansion past the bound, recursive aliases and keys given twice."""
    source = loader.name
    if loader.alias_marks:
        first = loader.alias_marks[0].line + 1
        distinct = sum(1 for _ in _walk(root))
        size = _expanded_size(root)
        if size is None:
            raise YamlError(
                f"{source}: an alias refers to the list or mapping that contains it (a recursive value; "
                f"first alias at line {first}); write the value out instead"
            )
        if size - distinct > MAX_ALIAS_NODES:
            raise YamlError(
                f"{source}: aliases expand the document by more than {MAX_ALIAS_NODES} values (first "
                f"alias at line {first}); a configuration needs far fewer: write the values out or use "
                "fewer aliases"
            )
    for node, path in _walk(root):
        if not isinstance(node, MappingNode):
            continue
        marks: dict[tuple[str, str], yaml.Mark] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            first, second = marks.setdefault((key.tag, key.value), key.start_mark), key.start_mark
            if first is not second:
                dotted = clip(f"{path}.{key.value}" if path else key.value)
                where = (
                    f"lines {first.line + 1} and {second.line + 1}"
                    if first.line != second.line
                    else f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"
                )
                raise YamlError(
                    f"{source}: key '{dotted}' is given twice ({where}); "
                    "YAML would silently keep only the second: merge them into one"
                )


def _one_line(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's error as one line: what and where (line, column), after the context it was in."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        return f"line {line}: character #x{exc.character:04x} is not allowed in YAML text (is it a binary file?)"
    if not isinstance(exc, yaml.MarkedYAMLError):
        return clip(" ".join(str(exc).split()), 300)

    def at(mark: yaml.Mark | None) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    parts = [clip(exc.context, 120) + at(exc.context_mark)] if exc.context else []
    parts.append(clip(exc.problem or "", 200) + at(exc.problem_mark))
    return ", ".join(parts)


def load(text: str, source: str) -> Any:
    """The plain data of one YAML document (None when empty); ``source`` names it in errors."""
    loader = None
    try:
        loader = _BoundedLoader(text, source)
        root = loader.get_single_node()
        if root is None:
            return None
        _check_graph(root, loader)
        return loader.construct_document(root)
    except YamlError:
        raise
    except yaml.constructor.ConstructorError as exc:
        raise YamlError(
            f"{source}: {_one_line(exc, text)}; only plain values, lists and mappings are read: remove the tag"
        ) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{source} is not valid YAML: {_one_line(exc, text)}; fix the syntax there") from None
    except (ValueError, OverflowError, TypeError) as exc:  # e.g. an int of 5000 digits, a date 2024-13-01
        raise YamlError(f"{source}: a value cannot be read ({clip(exc, 200)}); quote it to keep it as text") from None
    finally:
        if loader is not None:
            loader.dispose()
