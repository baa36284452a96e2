"""Strict schema validation of Kubernetes objects, run by tests/k8s with the interpreter of
`make k8s-tools`'s venv (where kubernetes-validate lives): YAML objects on stdin, the
Kubernetes version as the only argument, one JSON line per object on stdout.

Its own `kubernetes-validate` command only warns (and exits 0) for a kind it has no schema
for, so a misspelt kind or apiVersion would pass: here that is a result of its own,
"no-schema", which the tests accept only for the custom resources they name.
"""
import json
import sys

import yaml
from kubernetes_validate import utils


def main() -> int:
    version = sys.argv[1]
    for doc in yaml.safe_load_all(sys.stdin):
        if not doc:
            continue
        out = {"kind": doc.get("kind"), "apiVersion": doc.get("apiVersion"),
               "name": (doc.get("metadata") or {}).get("name")}
        try:
            out["version"] = utils.validate(doc, version, strict=True)
            out["result"] = "ok"
        except utils.ValidationError as exc:
            out.update(result="invalid", path=".".join(str(p) for p in exc.path), message=exc.message)
        except utils.SchemaNotFoundError as exc:
            out.update(result="no-schema", message=exc.message)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
