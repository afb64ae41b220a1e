"""The checks only this project can make of what `kubectl kustomize` rendered (scripts/lint-deploy):

    deploy_checks.py AUDIO_STORE_BINARY NODE_MODULES LABEL=RENDER.yaml...

`audio-store check-config` validates the ConfigMap's file with the Deployment's environment, and its
effective values, the Dockerfile and the manifests are checked against each other. Schemas are
kubernetes-validate's and KEDA's own models' (scripts/deploy_keda.mjs); pod hygiene is checkov's.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
APP = "audio-store"
KINDS = {"ConfigMap", "Deployment", "PodDisruptionBudget", "PodMonitoring", "ScaledObject", "Service",
         "ServiceAccount", "TriggerAuthentication"}
PROBES = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
# In seconds, the units of humantime's format_duration, which check-config prints ("1m 30s", "2days").
UNITS = {"year": 31_557_600, "month": 2_630_016, "day": 86_400, "h": 3_600, "m": 60, "s": 1,
         "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
counts = {True: 0, False: 0}


def check(ok, message, why=""):
    counts[bool(ok)] += 1
    print(f"  ok    {message}" if ok else f"  FAIL  {message}{': ' + why if why else ''}")
    return bool(ok)


def get(obj, *path, default=None):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def seconds(text):
    """A duration as check-config prints it, in seconds; None if it is not one."""
    parts = [re.fullmatch(r"(\d+)(year|month|day|h|ms|us|ns|m|s)s?", part) for part in str(text).split()]
    return sum(int(part[1]) * UNITS[part[2]] for part in parts) if parts and all(parts) else None


def dockerfile():
    """The runtime (last) stage's USER (its uid), EXPOSEd ports and ENV AUDIO_STORE_CONFIG."""
    stage = re.split(r"(?im)^FROM\s", (ROOT / "Dockerfile").read_text())[-1]
    user = (re.findall(r"(?im)^USER\s+([^\s:]+)", stage) or [""])[-1]
    exposed = {port.split("/")[0] for line in re.findall(r"(?im)^EXPOSE\s+(.+)$", stage)
               for port in line.split()}
    config = (re.findall(r"(?im)^ENV\s+AUDIO_STORE_CONFIG[= ](\S+)", stage) or [None])[-1]
    return user, exposed, config


def local_roots(toml_text, env):
    """sources.local_roots as the pod sees them: the variable read as the product reads a list."""
    value = env.get("AUDIO_STORE__SOURCES__LOCAL_ROOTS")
    try:
        if value is None:
            return get(tomllib.loads(toml_text), "sources", "local_roots", default=[])
        if value.strip().startswith("["):
            return tomllib.loads(f"list = {value.strip()}")["list"]
    except tomllib.TOMLDecodeError:
        return None  # check-config says why
    return [item.strip() for item in value.split(",") if item.strip()]


def check_config(binary, toml_text, name, env, roots):
    """The effective configuration, from `audio-store check-config`; None if it refuses the file.

    check-config (rightly) refuses a missing local root, and the pod's volumes are not here: each
    root is stood in for by an empty directory of the same path under a temporary one. Where the
    roots are (on a writable volume, so not relative nor `/`) is checked against the pod's mounts.
    """
    with tempfile.TemporaryDirectory(prefix="lint-deploy-") as tmp:
        path = Path(tmp, "config.toml")
        path.write_text(toml_text)
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env, "AUDIO_STORE_CONFIG": str(path)}
        if roots is not None:
            stand_ins = [Path(tmp, "roots", os.path.normpath(f"/{root}").lstrip("/")) for root in roots]
            for stand_in in stand_ins:
                stand_in.mkdir(parents=True, exist_ok=True)
            run_env["AUDIO_STORE__SOURCES__LOCAL_ROOTS"] = json.dumps([str(s) for s in stand_ins])
        result = subprocess.run([binary, "check-config"], env=run_env, cwd=tmp,
                                capture_output=True, text=True, timeout=60)
    problem = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
    ok = check(result.returncode == 0, "`audio-store check-config` accepts the ConfigMap's file with "
               "the Deployment's environment", problem.replace(str(path), name))
    return tomllib.loads(result.stdout) if ok else None


def check_keda(node_modules, docs):
    keda = [doc for doc in docs if doc.get("apiVersion", "").startswith("keda.sh/")]
    result = subprocess.run(["node", ROOT / "scripts" / "deploy_keda.mjs", node_modules],
                            input=json.dumps(keda), capture_output=True, text=True, timeout=120)
    if check(result.returncode == 0, "node scripts/deploy_keda.mjs", result.stderr.strip()):
        for name, error in json.loads(result.stdout).items():
            check(error is None, f"{name} is valid by KEDA's own models", error)


def check_render(docs, docker, binary):
    """The Deployment against the Dockerfile and the effective configuration, and what points at it."""
    def find(kind, name=APP):
        return next((d for d in docs if d.get("kind") == kind and get(d, "metadata", "name") == name), None)
    rendered = {doc.get("kind") for doc in docs}
    check(KINDS <= rendered, "renders " + ", ".join(sorted(KINDS)), f"missing {sorted(KINDS - rendered)}")
    user, exposed, image_config = docker
    template = get(find("Deployment"), "spec", "template", default={})
    pod, labels = template.get("spec", {}), get(template, "metadata", "labels", default={})
    c = next((c for c in pod.get("containers", []) if c.get("name") == APP), None)
    if not check(c, f"a Deployment {APP} with a container {APP}"):
        return
    run_as = get(c, "securityContext", "runAsUser", default=get(pod, "securityContext", "runAsUser"))
    check(user.isdigit() and int(user) != 0 and str(run_as) == user,
          f"runAsUser ({run_as}) is the Dockerfile's USER ({user}), a non-root uid",
          "USER must be a number (the kubelet checks runAsNonRoot only on one), not 0, and runAsUser")
    port = next((p.get("containerPort") for p in c.get("ports", []) if p.get("name") == "http"), None)
    check(str(port) in exposed, f"the Dockerfile EXPOSEs the http port ({port})", f"EXPOSE {sorted(exposed)}")
    http = ("http", port) if port is not None else ()  # the port, by its name or its number
    for probe, path in PROBES.items():
        action = get(c, probe, "httpGet", default={})
        check(action.get("path") == path and action.get("port") in http,
              f"{probe} GETs {path} on the http port", f"got {action}")

    # The file system: the configuration, TMPDIR, the local roots.
    volumes = {v.get("name"): v for v in pod.get("volumes", [])}
    mounts = {m.get("mountPath"): m for m in c.get("volumeMounts", [])}
    env = {var["name"]: str(var["value"]) for var in c.get("env", []) if "value" in var}
    tmp = mounts.get("/tmp", {})
    check(env.get("TMPDIR") == "/tmp" and not tmp.get("readOnly")
          and "emptyDir" in volumes.get(tmp.get("name"), {}),
          "TMPDIR=/tmp is a writable emptyDir (the root filesystem is read-only)")
    config = env.get("AUDIO_STORE_CONFIG", "")
    check(config == image_config, f"AUDIO_STORE_CONFIG ({config}) is the Dockerfile's ({image_config})")
    config_dir, _, config_file = config.rpartition("/")
    config_mount = mounts.get(config_dir, {})
    config_map = get(volumes, config_mount.get("name"), "configMap", "name")
    toml_text = get(find("ConfigMap", config_map), "data", config_file)
    if not check(toml_text is not None and config_mount.get("readOnly") is True,
                 "AUDIO_STORE_CONFIG is in a ConfigMap of the render, mounted read-only"):
        return
    roots = local_roots(toml_text, env)
    cfg = check_config(binary, toml_text, f"ConfigMap {config_map}/{config_file}", env, roots)
    if cfg is None:
        return
    for root in map(str, roots or []):
        covering = [path for path in mounts if root == path or root.startswith(path.rstrip("/") + "/")]
        mount = mounts[max(covering, key=len)] if covering else {}
        check(mount and not mount.get("readOnly") and mount is not tmp,
              f"sources.local_roots {root} is on a writable volume of its own (its files are deleted)",
              f"it is on {mount.get('mountPath')}, read-only: {mount.get('readOnly', False)}")

    # The effective configuration against the pod.
    listen = str(get(cfg, "http", "listen", default=""))
    host, _, listen_port = listen.rpartition(":")
    check(listen_port == str(port) and host.strip("[]") not in ("127.0.0.1", "localhost", "::1"),
          f"http.listen ({listen}) is the http port ({port}), not loopback", "the probes could not reach it")
    grace, period = get(cfg, "worker", "shutdown_grace"), pod.get("terminationGracePeriodSeconds", 30)
    check(isinstance(period, int) and seconds(grace) is not None and period > seconds(grace),
          f"terminationGracePeriodSeconds ({period}) > worker.shutdown_grace ({grace})",
          "Kubernetes would kill the pod before in-flight messages are finished or nacked")
    check(find("ServiceAccount", pod.get("serviceAccountName")), "serviceAccountName is in the render")

    # What points at the pods.
    service, monitor, budget = find("Service"), find("PodMonitoring"), find("PodDisruptionBudget")
    for kind, doc in (("Service", service), ("PodMonitoring", monitor), ("PodDisruptionBudget", budget)):
        selector = get(doc, "spec", "selector", default={})  # the Service's is a map, the others' matchLabels
        selector = selector.get("matchLabels", selector)
        check(selector and selector.items() <= labels.items(), f"the {kind} selects the Deployment's pods")
    targets = [p.get("targetPort", p.get("port")) for p in get(service, "spec", "ports", default=[])]
    check(targets and all(t in http for t in targets), "the Service targets the http port", f"{targets}")
    endpoints = get(monitor, "spec", "endpoints", default=[])
    scraped = [(endpoint.get("port"), endpoint.get("path", "/metrics")) for endpoint in endpoints]
    check(scraped and all(p in http and path == "/metrics" for p, path in scraped),
          "the PodMonitoring scrapes /metrics on the http port", f"it scrapes {scraped}")
    spec = get(find("ScaledObject"), "spec", default={})
    target = spec.get("scaleTargetRef", {})
    check(target.get("kind", "Deployment") == "Deployment" and target.get("name") == APP,
          f"the ScaledObject scales Deployment/{APP}", f"it scales {target.get('kind')}/{target.get('name')}")
    low = spec.get("minReplicaCount", 0)
    check(isinstance(low, int) and low >= 1, f"the ScaledObject keeps at least 1 replica ({low})",
          "it cannot wake a worker from 0")
    min_available = get(budget, "spec", "minAvailable")
    if isinstance(min_available, int) and isinstance(low, int):
        check(min_available < low, f"PDB minAvailable ({min_available}) < minReplicaCount ({low})",
              "node drains would block")
    subscription = str(get(cfg, "pubsub", "subscription", default="")).rpartition("/")[2]
    queries = [get(t, "metadata", "query") if t.get("type") == "prometheus" else None
               for t in spec.get("triggers", [])]
    check(queries and all(f'subscription_id="{subscription}"' in (query or "") for query in queries),
          f"every trigger is a prometheus query naming pubsub.subscription ({subscription})",
          f"queries {queries} (None: not prometheus)")


def main():
    binary, node_modules, *renders = sys.argv[1:]
    for label, _, file in (item.partition("=") for item in renders):
        print(f"==> {label} ({file})")
        docs = [doc for doc in yaml.safe_load_all(Path(file).read_text()) if doc]
        check_keda(node_modules, docs)
        check_render(docs, dockerfile(), binary)
        if label.startswith("k8s/overlays/"):  # an overlay is deployable as it is
            check("PROJECT_ID" not in yaml.safe_dump_all(docs), "no PROJECT_ID placeholder left")
    print(f"cross-checks: {counts[True]} passed, {counts[False]} failed")
    return 1 if counts[False] else 0


if __name__ == "__main__":
    sys.exit(main())
