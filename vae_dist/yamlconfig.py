"""The strict YAML reader behind ``--config run.yaml``: plain data, read as JSON would read it.

PyYAML's SafeLoader follows YAML 1.1: ``1e-3`` is a string, ``yes``/``on``/``off`` are booleans and a
repeated key silently keeps the last value. Here exponent numbers are floats, only true/false are
booleans (``wandb_mode: off`` stays a string), keys are unique strings, and anchors and aliases are
refused (a config needs none, and they let a small file expand into a huge tree).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent

from vae_dist.errors import first_line

BOOL, FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"


class StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            mark = self.peek_event().start_mark
            raise ConstructorError(None, None, "anchors and aliases are not allowed in a config", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str) or key in seen:
                problem = "is not a string" if not isinstance(key, str) else "is given twice"
                raise ConstructorError(None, None, f"key {key!r} {problem}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# The class's own resolver table, without YAML 1.1's yes/no/on/off booleans; 1e-3 a float as in JSON.
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
StrictLoader.add_implicit_resolver(FLOAT, re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load(text: str) -> Any:
    """The document's data; a ValueError whose message is one line (with the line number) if it is not valid."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader: plain data only)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ValueError(f"{e.problem or e.context}" + (f" at line {mark.line + 1}" if mark else "")) from None
    except yaml.YAMLError as e:
        raise ValueError(first_line(e)) from None
