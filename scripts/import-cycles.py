#!/usr/bin/env python3
"""Import cycles among the files of a crate's src/ (default collector/src).

A file imports another when it names `crate::<module>` (or `super::<sibling>`) of that
file. Prints the strongly connected components with more than one file, and the number
of elementary cycles (networkx.simple_cycles); a cycle between two files counts as one.
"""
import os, re, sys
import networkx as nx

root = sys.argv[1] if len(sys.argv) > 1 else "collector/src"
files = {}
for d, _, names in os.walk(root):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)[:-3]
            parts = rel.split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            files["::".join(parts)] = p

def strip_tests(src):
    # Unit-test modules are not part of the layering.
    i = src.find("#[cfg(test)]")
    return src if i < 0 else src[:i]

g = nx.DiGraph()
for mod, path in files.items():
    g.add_node(mod)
    src = strip_tests(open(path).read())
    names = set()
    for m in re.finditer(r"crate::((?:\w+::)*\w+)", src):
        names.add(m.group(1))
    for m in re.finditer(r"use crate::\{([^}]*)\}", src):
        for part in m.group(1).split(","):
            names.add(part.strip().split("::")[0].split(" ")[0])
    parent = mod.rsplit("::", 1)[0] if "::" in mod else ""
    for m in re.finditer(r"super::(\w+)", src):
        names.add((parent + "::" if parent else "") + m.group(1))
    for n in names:
        segs = n.split("::")
        # the longest prefix that is a file
        for k in range(len(segs), 0, -1):
            cand = "::".join(segs[:k])
            if cand in files and cand != mod and cand != "":
                g.add_edge(mod, cand)
                break

sccs = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
cycles = list(nx.simple_cycles(g))
print(f"files: {len(files)}  edges: {g.number_of_edges()}")
for c in sccs:
    print(f"cycle component ({len(c)} files): {' '.join(c)}")
print(f"components with a cycle: {len(sccs)}")
print(f"elementary import cycles: {len(cycles)}")
