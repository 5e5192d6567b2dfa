#!/usr/bin/env bash
# Check the deployment files without a Docker engine or an AWS account:
#   compose     docker-compose.yml against the Compose specification's JSON schema, plus references
#               (depends_on, configs, volumes, images) and a healthcheck on every service
#   terraform   every terraform/*.tf parses (python-hcl2); checkov reports no failed check
#   alerts      promtool: the alert rules, their unit tests and prometheus.yml
#   dockerfile  the Dockerfile parses: stages, a non-root final USER, ENTRYPOINT sluice
#   all         (default) all of the above
# Installs what it needs, idempotently: the Python tools into the project venv (scripts/pyenv.sh),
# promtool from Debian's `prometheus` package. Exits non-zero on the first failed check.
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
venv="$(scripts/pyenv.sh)"
py="$venv/bin/python"
cache="${SLUICE_CACHE:-$HOME/.cache/sluice}"

# The Compose specification's JSON schema, from the docker-compose 1.29.2 package on PyPI (it ships
# compose/config/compose_spec.json); fetched once, without installing the package.
compose_schema() {
  local schema="$cache/compose-spec/compose_spec.json"
  if [ ! -s "$schema" ]; then
    mkdir -p "$cache/compose-spec"
    exec 8>"$cache/compose-spec.lock"
    flock 8
    if [ ! -s "$schema" ]; then
      local tmp
      tmp="$(mktemp -d)"
      "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$tmp" 'docker-compose==1.29.2' >&2
      "$py" - "$tmp"/docker_compose-1.29.2-*.whl "$schema.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, open(sys.argv[2], "wb") as out:
    out.write(wheel.read("compose/config/compose_spec.json"))
PY
      mv "$schema.tmp" "$schema"
      rm -rf "$tmp"
    fi
    exec 8>&-
  fi
  echo "$schema"
}

check_compose() {
  echo "== compose: docker-compose.yml"
  "$py" - docker-compose.yml "$(compose_schema)" <<'PY'
import json, os, sys
import jsonschema, yaml

path, schema_path = sys.argv[1], sys.argv[2]
with open(path) as f:
    doc = yaml.safe_load(f)  # resolves the anchors and << merge keys, as Compose does
with open(schema_path) as f:
    schema = json.load(f)

errors = []
# The file's $schema says draft 2019-09 (with a non-canonical URI jsonschema does not recognise).
validator = jsonschema.Draft201909Validator(schema)
for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
    where = "/".join(str(p) for p in e.absolute_path) or "(top)"
    errors.append(f"schema: {where}: {e.message}")

services = doc.get("services") or {}
if not services:
    errors.append("no services")
base = os.path.dirname(os.path.abspath(path))
built_images = {s.get("image") for s in services.values() if "build" in s}
for name, svc in services.items():
    deps = svc.get("depends_on") or {}
    for dep in deps:
        if dep not in services:
            errors.append(f"{name}: depends_on names no service: {dep}")
        elif dep == name:
            errors.append(f"{name}: depends on itself")
    if isinstance(deps, dict):
        for dep, cond in deps.items():
            if (cond or {}).get("condition") == "service_healthy" and dep in services \
                    and not (services[dep].get("healthcheck") or {}).get("test"):
                errors.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
    hc = svc.get("healthcheck")
    if not hc or hc.get("disable") or not hc.get("test"):
        errors.append(f"{name}: no healthcheck")
    for c in svc.get("configs") or []:
        src = c if isinstance(c, str) else c.get("source")
        if src not in (doc.get("configs") or {}):
            errors.append(f"{name}: config {src} is not declared under configs:")
    for v in svc.get("volumes") or []:
        src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith((".", "/")):
            if not os.path.exists(os.path.join(base, src)):
                errors.append(f"{name}: bind-mounted {src} does not exist")
        elif src and src not in (doc.get("volumes") or {}):
            errors.append(f"{name}: volume {src} is not declared under volumes:")
    image = svc.get("image", "")
    if "build" not in svc and image.startswith("sluice") and image not in built_images:
        errors.append(f"{name}: image {image} is built by no service")
for cname, c in (doc.get("configs") or {}).items():
    if "file" in c and not os.path.exists(os.path.join(base, c["file"])):
        errors.append(f"configs.{cname}: file {c['file']} does not exist")

# Cycles in depends_on would deadlock `docker compose up`.
def visit(n, stack):
    if n in stack:
        errors.append("depends_on cycle: " + " -> ".join(stack + [n]))
        return
    for d in (services.get(n) or {}).get("depends_on") or {}:
        visit(d, stack + [n])
for n in services:
    visit(n, [])

if errors:
    print("\n".join(f"FAIL {e}" for e in errors))
    sys.exit(1)
print(f"ok: {len(services)} services valid against the Compose schema, references and healthchecks")
PY
}

check_terraform() {
  echo "== terraform: parse"
  "$py" - terraform <<'PY'
import glob, sys
import hcl2
files = sorted(glob.glob(sys.argv[1] + "/*.tf"))
if not files:
    sys.exit("no .tf files")
bad = 0
variables, outputs = 0, 0
for f in files:
    try:
        with open(f) as fh:
            doc = hcl2.load(fh)
    except Exception as e:  # a file checkov could not parse would be silently unchecked
        print(f"FAIL {f}: {e}")
        bad += 1
        continue
    for kind in ("variable", "output"):
        for block in doc.get(kind, []):
            for name, body in block.items():
                if kind == "variable":
                    variables += 1
                else:
                    outputs += 1
                if not body.get("description"):
                    print(f"FAIL {f}: {kind} {name} has no description")
                    bad += 1
if bad:
    sys.exit(1)
print(f"ok: {len(files)} files parse; {variables} variables and {outputs} outputs described")
PY
  echo "== terraform: checkov"
  # --skip-download: no calls to the vendor's platform (there is no internet here).
  "$venv/bin/checkov" -d terraform --quiet --compact --skip-download
}

check_alerts() {
  if ! command -v promtool >/dev/null 2>&1; then
    echo "check-deploy: installing promtool (Debian's prometheus package)" >&2
    exec 7>"$cache/apt.lock"
    flock 7
    if ! command -v promtool >/dev/null 2>&1; then
      sudo_=""
      [ "$(id -u)" -eq 0 ] || sudo_="sudo"
      # The package may start a prometheus service where systemd runs; nothing here uses it.
      $sudo_ apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
      DEBIAN_FRONTEND=noninteractive $sudo_ apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
        prometheus >&2
    fi
    exec 7>&-
  fi
  echo "== alerts: promtool"
  (cd deploy/prometheus \
    && promtool check rules alerts.yml \
    && promtool test rules alerts_test.yml \
    && promtool check config prometheus.yml)
}

check_dockerfile() {
  echo "== dockerfile"
  "$py" - Dockerfile <<'PY'
import json, os, sys
from dockerfile_parse import DockerfileParser

p = DockerfileParser(path=sys.argv[1])
ins = p.structure
errors = []
froms = [i for i in ins if i["instruction"] == "FROM"]
if len(froms) < 2:
    errors.append(f"not multi-stage: {len(froms)} FROM")
stages = []
for i in froms:
    words = i["value"].split()
    if len(words) >= 3 and words[-2].lower() == "as":
        stages.append(words[-1])
final_start = froms[-1]["startline"] if froms else 0
final = [i for i in ins if i["startline"] >= final_start]
for i in ins:
    if i["instruction"] in ("COPY", "ADD"):
        words = i["value"].split()
        flags = [w for w in words if w.startswith("--")]
        srcs = [w for w in words if not w.startswith("--")][:-1]
        from_ = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
        if from_:
            if from_[0] not in stages[: len(stages)]:
                errors.append(f"line {i['startline'] + 1}: COPY --from={from_[0]} names no stage")
        else:
            for s in srcs:
                if not os.path.exists(s):
                    errors.append(f"line {i['startline'] + 1}: COPY source {s} does not exist")
builds = [i for i in ins if i["instruction"] == "RUN" and "cargo build" in i["value"]]
if not any("--release" in b["value"] and "--bin sluice" in b["value"] for b in builds):
    errors.append("no `cargo build --release --bin sluice`")
users = [i["value"].strip() for i in final if i["instruction"] == "USER"]
if not users:
    errors.append("the final stage sets no USER (it would run as root)")
elif users[-1].split(":")[0] in ("root", "0"):
    errors.append(f"the final stage runs as {users[-1]}")
entry = [i["value"] for i in final if i["instruction"] == "ENTRYPOINT"]
if not entry or json.loads(entry[-1])[0] not in ("sluice", "/usr/local/bin/sluice"):
    errors.append(f"ENTRYPOINT is not sluice: {entry}")
if not any(i["instruction"] == "EXPOSE" and "8080" in i["value"].split() for i in final):
    errors.append("the final stage does not EXPOSE 8080")
ignore = open(".dockerignore").read().split() if os.path.exists(".dockerignore") else []
for must in ("target/", ".git"):
    if must not in ignore:
        errors.append(f".dockerignore does not exclude {must}")
if errors:
    print("\n".join(f"FAIL {e}" for e in errors))
    sys.exit(1)
print(f"ok: {len(froms)} stages ({', '.join(stages)}), final USER {users[-1]}, ENTRYPOINT {entry[-1]}")
PY
}

case "$what" in
  compose) check_compose ;;
  terraform) check_terraform ;;
  alerts) check_alerts ;;
  dockerfile) check_dockerfile ;;
  all) check_compose && check_terraform && check_alerts && check_dockerfile ;;
  *) echo "usage: $0 [compose|terraform|alerts|dockerfile|all]" >&2; exit 2 ;;
esac
