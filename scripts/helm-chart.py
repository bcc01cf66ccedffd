#!/usr/bin/env python3
"""`helm lint` and `helm template` for a local chart, through Helm's own Go packages.

The helm binary is on no package registry these machines reach; PyPI's `helm-python-sdk`
(installed by scripts/tools.sh) ships Helm v4's chart loader, lint rules and template engine as a
shared library, and this script drives it:

    scripts/helm-chart.py lint CHART [-f VALUES.yaml]...
        Helm's lint rules in strict mode (warnings fail too), with the chart's values overlaid by
        each VALUES file in turn. Prints the findings as `helm lint` does; exit 1 on any.

    scripts/helm-chart.py template CHART [-f VALUES.yaml]... [--name N] [--namespace NS]
        Renders the chart offline, as an install would, and prints a JSON array of
        {"source": "<chart>/templates/x.yaml", "manifest": {...}}, one per rendered Kubernetes
        object (the YAML parsed by Helm's own YAML library), so that tests need no YAML parser.

    scripts/helm-chart.py notes CHART [-f VALUES.yaml]... [--name N] [--namespace NS]
        Renders the chart the same way and prints its NOTES.txt, as `helm install` shows it.

Run with PYTHONPATH naming the helm-python-sdk install (`scripts/tools.sh env`).
"""

import argparse
import json
import sys

try:
    import helm_python
except ImportError:
    sys.exit(
        "helm-chart.py: the helm_python module (PyPI helm-python-sdk) is not importable: run "
        "scripts/tools.sh and set PYTHONPATH to the HELM_CHART_PYTHONPATH it prints"
    )

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def overlay(base, top):
    """Helm's merge of a values file over earlier ones: maps merge, anything else replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def values(files):
    merged = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            merged = overlay(merged, helm_python.values_from_yaml(f.read()) or {})
    return merged


def lint(args):
    report = helm_python.lint(args.chart, values(args.values), strict=True)
    findings = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
    for m in report.get("messages") or []:
        print(f"[{SEVERITY.get(m.get('severity'), '?')}] {m.get('path')}: {m.get('error')}")
    for e in report.get("errors") or []:
        print(f"[ERROR] {e}")
    linted = report.get("total_charts_linted", 0)
    failed = bool(findings or report.get("errors")) or linted < 1
    print(f"{linted} chart(s) linted, {'failed' if failed else 'no failures'}")
    return 1 if failed else 0


def documents(text):
    """The YAML documents of one rendered template (Helm's `---` separators)."""
    doc = []
    for line in text.splitlines():
        if line.rstrip() == "---" or line.startswith("--- "):
            yield "\n".join(doc)
            doc = []
        else:
            doc.append(line)
    yield "\n".join(doc)


def template(args):
    chart = helm_python.Chart.load(args.chart)
    rendered = chart.render(
        values(args.values), name=args.name, namespace=args.namespace, is_install=True
    )
    out = []
    for source in sorted(rendered):
        if not source.endswith((".yaml", ".yml")):
            continue  # NOTES.txt, helpers
        for doc in documents(rendered[source]):
            body = "\n".join(l for l in doc.splitlines() if not l.lstrip().startswith("#"))
            if not body.strip():
                continue
            manifest = helm_python.values_from_yaml(doc)
            if not isinstance(manifest, dict) or "kind" not in manifest:
                print(f"helm-chart.py: {source} rendered a document that is no Kubernetes "
                      f"object:\n{doc}", file=sys.stderr)
                return 1
            out.append({"source": source, "manifest": manifest})
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


def notes(args):
    chart = helm_python.Chart.load(args.chart)
    rendered = chart.render(
        values(args.values), name=args.name, namespace=args.namespace, is_install=True
    )
    # The top chart's notes only (a subchart's are at <chart>/charts/<sub>/templates/NOTES.txt).
    top = [s for s in rendered if s.count("/") == 2 and s.endswith("/templates/NOTES.txt")]
    if not top:
        print("helm-chart.py notes: the chart has no templates/NOTES.txt", file=sys.stderr)
        return 1
    print(rendered[top[0]])
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_lint = sub.add_parser("lint", help="Helm's lint rules, strict")
    p_lint.add_argument("chart")
    p_lint.add_argument("-f", "--values", action="append", default=[])
    p_tpl = sub.add_parser("template", help="render the chart; JSON array of objects")
    p_tpl.add_argument("chart")
    p_tpl.add_argument("-f", "--values", action="append", default=[])
    p_tpl.add_argument("--name", default="release-name")
    p_tpl.add_argument("--namespace", default="default")
    p_notes = sub.add_parser("notes", help="render the chart; print its NOTES.txt")
    p_notes.add_argument("chart")
    p_notes.add_argument("-f", "--values", action="append", default=[])
    p_notes.add_argument("--name", default="release-name")
    p_notes.add_argument("--namespace", default="default")
    args = parser.parse_args()
    commands = {"lint": lint, "template": template, "notes": notes}
    try:
        return commands[args.command](args)
    except helm_python.HelmError as e:
        print(f"helm-chart.py {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
