"""Offline schema check of CiliumNetworkPolicy YAML against a CRD's openAPIV3Schema.

Usage: check_crd_schema.py CRD.yaml DOCUMENTS.yaml

Runs with the Python of the kubernetes-validate venv (~/.cache/bulkhead/venv), which
already ships `jsonschema` and `PyYAML`. kubernetes-validate itself knows only built-in
kinds (it exits 0 with a WARN on a CRD kind), so learner/tests/export.rs calls this for
CiliumNetworkPolicy instead.

Stricter than the API server on purpose: every schema object that lists `properties`
(and does not preserve unknown fields) is closed, so a misspelt field is an error here
rather than being pruned silently. Prints `OK <kind>/<name>` per valid document; exits 1
with one `ERROR ...` line per problem otherwise.
"""

import ipaddress
import sys

import jsonschema
import yaml


def close(node):
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            close(value)
    elif isinstance(node, list):
        for value in node:
            close(value)


def main(crd_path, docs_path):
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    schemas = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
    for schema in schemas.values():
        close(schema)

    formats = jsonschema.FormatChecker()

    @formats.checks("cidr", raises=ValueError)
    def is_cidr(value):
        # Kubernetes' "cidr" format is Go's net.ParseCIDR: host bits may be set.
        if not isinstance(value, str) or "/" not in value:
            raise ValueError(f"{value!r} is not a CIDR")
        ipaddress.ip_network(value, strict=False)
        return True

    errors = 0
    with open(docs_path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if not docs:
        print(f"ERROR {docs_path}: no documents")
        return 1
    for doc in docs:
        api_version = doc.get("apiVersion", "")
        name = (doc.get("metadata") or {}).get("name", "?")
        where = f"{doc.get('kind')}/{name}"
        if doc.get("kind") != kind or not api_version.startswith(group + "/"):
            print(f"ERROR {where}: not a {group} {kind}")
            errors += 1
            continue
        version = api_version.split("/", 1)[1]
        schema = schemas.get(version)
        if schema is None:
            print(f"ERROR {where}: the CRD does not serve version {version}")
            errors += 1
            continue
        validator = jsonschema.Draft4Validator(schema, format_checker=formats)
        problems = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        for problem in problems:
            path = ".".join(str(p) for p in problem.absolute_path) or "(root)"
            print(f"ERROR {where}: {path}: {problem.message}")
        errors += len(problems)
        if not problems:
            print(f"OK {where}")
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
