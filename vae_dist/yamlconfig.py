"""A strict YAML loader for ``--config run.yaml``: plain data, read as JSON would read it.

PyYAML's SafeLoader follows YAML 1.1, whose implicit types surprise a config: ``1e-3`` is
a string (1.1 wants a dot), ``yes``/``no``/``on``/``off`` are booleans, a repeated key
silently keeps the last value. Here numbers in exponent form are floats, only
true/false are booleans (``wandb_mode: off`` stays the string it looks like), keys must
be unique strings, and anchors/aliases are refused (a config needs none, and they let a
small file expand into a huge tree).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode

BOOL = "tag:yaml.org,2002:bool"
FLOAT = "tag:yaml.org,2002:float"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with the rules of the module docstring."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise ConstructorError(None, None, "anchors and aliases are not allowed in a config", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise ConstructorError(None, None, f"key {key!r} is not a string", key_node.start_mark)
                if key in seen:
                    raise ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# The class's own copy of the resolver table, without YAML 1.1's yes/no/on/off booleans.
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# 1e-3, 2E5, -1e+4: floats as in JSON (YAML 1.1 needs a dot, YAML 1.2 does not).
StrictLoader.add_implicit_resolver(FLOAT, re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
