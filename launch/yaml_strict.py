"""YAML for configs, read strictly: a key given twice in one mapping is an error (PyYAML keeps the last one
silently, so a second `train:` section would drop the first's keys), and aliases are bounded (a few hundred
bytes of nested aliases expand to millions of values: the "billion laughs"). The node tree is composed
without expanding aliases, checked, then constructed."""

from __future__ import annotations

from typing import Any, Dict

import yaml

MAX_ALIASES = 100
"""Alias uses (`*name`) a config may hold."""
MAX_EXPANDED_NODES = 100_000
"""Values a config may expand to once every alias is replaced by what it names."""


class YamlConfigError(ValueError):
    """A YAML config that parses but is refused (duplicate key, too many aliases)."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                line = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                continue
            if line != key_node.start_mark.line + 1:
                raise YamlConfigError(
                    f"key {key!r} appears twice in one mapping (lines {line} and {key_node.start_mark.line + 1}); "
                    "the second would silently replace the first. Merge them into one."
                )
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> tuple:
    """(alias uses, nodes once aliases are expanded), stopping early past the bounds."""
    aliases = 0
    sizes: Dict[int, int] = {}
    seen_ids: set = set()

    def size(node: yaml.Node) -> int:
        nonlocal aliases
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in seen_ids:  # a recursive alias: PyYAML builds a cyclic object; count it once
            return 1
        seen_ids.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        total = 1
        for child in children:
            if id(child) in sizes or id(child) in seen_ids:
                aliases += 1
            total += size(child)
            if total > MAX_EXPANDED_NODES or aliases > MAX_ALIASES:
                break
        sizes[key] = total
        return total

    return aliases, size(root)


def load_yaml(text: str) -> Any:
    """The YAML document in `text`, refusing duplicate keys and alias bombs (YamlConfigError); YAML syntax
    errors raise yaml.YAMLError as usual."""
    loader = _StrictLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise YamlConfigError("it is nested too deeply to read; a config is a few levels deep.") from None
        if root is None:
            return None
        aliases, nodes = _expanded_size(root)
        if aliases > MAX_ALIASES or nodes > MAX_EXPANDED_NODES:
            raise YamlConfigError(
                f"it uses more than {MAX_ALIASES} aliases or expands to more than {MAX_EXPANDED_NODES:,} values "
                "once its aliases (*name) are expanded; a config needs neither. Write the values out."
            )
        return loader.construct_document(root)
    finally:
        loader.dispose()
