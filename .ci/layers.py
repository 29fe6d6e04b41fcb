#!/usr/bin/env python3
"""Checks the layering of node/src that its module essays promise.

1. The modules of node/src (top level: `raft`, `router`, `service`, ...)
   import each other without a circle: every `crate::<module>` path in a
   file is an arrow from the file's module to that module.
2. Only the edges name the generated proto types (`idgraph_proto`): the
   client-facing adapters (`service`), the peer transport (`peer`), the
   transport security around both (`auth`, `tls`: the bearer token on the
   wire) and the process wiring (`server.rs`, `main.rs`).

Prints each violation and exits 1 if there is one. Usage: .ci/layers.py
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "node" / "src"
PROTO_ALLOWED = {"service", "peer", "auth", "tls", "server", "main"}


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def code_lines(text: str):
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("//"):
            yield line


def main() -> int:
    arrows: dict[str, set[str]] = {}
    failures = []
    for path in sorted(SRC.rglob("*.rs")):
        module = module_of(path)
        if module == "lib":
            continue
        text = "\n".join(code_lines(path.read_text()))
        for target in re.findall(r"\bcrate::(\w+)", text):
            if target != module:
                arrows.setdefault(module, set()).add(target)
        if "idgraph_proto" in text and module not in PROTO_ALLOWED:
            failures.append(f"{path.relative_to(SRC.parent.parent)} names the generated proto types outside the edges")
    # Circles: depth-first search over the module graph.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(arrows.get(m, ())):
            if state.get(n) == 1:
                failures.append("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(arrows):
        if m not in state:
            visit(m)
    for f in failures:
        print(f)
    if not failures:
        print("layers: no import circle among", len(arrows), "modules; proto only in", ", ".join(sorted(PROTO_ALLOWED)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
