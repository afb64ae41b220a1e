"""The project's own checks of the rendered Kubernetes manifests.

Run by scripts/lint-deploy, after it rendered every kustomization with
`kubectl kustomize`:

    deploy_checks.py --audio-store BIN [--keda NODE_MODULES] LABEL=RENDER.yaml...

These are the checks no general linter can make, because they need the
product or the Dockerfile: the ConfigMap's configuration is validated by
`audio-store check-config` itself, with the environment the Deployment gives
the pod, and its effective values (the port, the shutdown grace, the
subscription, the local roots) are checked against the manifests. Pod hygiene
(non-root, read-only root filesystem, resources, ...) is checkov's
(k8s/checkov.yaml); the schemas of the built-in kinds are kubernetes-validate's
and those of KEDA's kinds are KEDA's own models' (scripts/deploy_keda.mjs).

A label under k8s/overlays/ is an overlay: it must be deployable as it is (no
placeholder left). Prints one line per check; exits 1 if any failed.
Standard library and PyYAML only.
"""

import argparse
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
PLACEHOLDER = "PROJECT_ID"
REQUIRED_KINDS = {
    "ConfigMap": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "PodMonitoring": "monitoring.googleapis.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}
GMP_PROMQL = re.compile(r"^https://monitoring\.googleapis\.com/v1/projects/([^/]+)/location/global/prometheus$")
GSA = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@([a-z][a-z0-9-]{4,28}[a-z0-9])\.iam\.gserviceaccount\.com$")
# The units of humantime's format_duration, which check-config prints every
# duration with ("25s", "1m 30s", "1day 2h"), in seconds.
DURATION_UNITS = {
    "year": 31_557_600, "years": 31_557_600, "month": 2_630_016, "months": 2_630_016,
    "day": 86_400, "days": 86_400, "h": 3_600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9,
}


class Report:
    """Counts and prints the checks."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def section(self, title):
        print(f"==> {title}", flush=True)

    def check(self, condition, message, why=""):
        if condition:
            self.passed += 1
            print(f"  ok    {message}")
        else:
            self.failed += 1
            print(f"  FAIL  {message}{': ' + why if why else ''}")
        return bool(condition)

    def note(self, message):
        print(f"  note  {message}")


def get(obj, *path, default=None):
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return default
    return obj


def seconds(text):
    """A duration as check-config prints it, in seconds; None if it is not one."""
    parts = str(text).split()
    total = 0.0
    for part in parts:
        match = re.fullmatch(r"(\d+)([a-z]+)", part)
        if not match or match.group(2) not in DURATION_UNITS:
            return None
        total += int(match.group(1)) * DURATION_UNITS[match.group(2)]
    return total if parts else None


def container_port(container, ref):
    """The containerPort that a probe, Service or monitor port (a name or a number) refers to."""
    for port in container.get("ports", []):
        if ref == port.get("name") or ref == port.get("containerPort"):
            return port.get("containerPort")
    return None


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def dockerfile_facts():
    """USER, EXPOSE, ENV AUDIO_STORE_CONFIG and ENTRYPOINT of the Dockerfile's runtime stage."""
    final = re.split(r"(?im)^FROM\s", (ROOT / "Dockerfile").read_text())[-1]

    def last(pattern):
        found = re.findall(pattern, final)
        return found[-1] if found else None

    return {
        "user": last(r"(?im)^USER\s+(\S+)"),
        "expose": re.findall(r"(?im)^EXPOSE\s+(\d+)", final),
        "config": last(r"(?im)^ENV\s+AUDIO_STORE_CONFIG[= ](\S+)"),
        "entrypoint": last(r"(?im)^ENTRYPOINT\s+(.+)$"),
    }


def check_sources(report):
    """Conventions of the files in k8s/: each says what it is for, and nothing in the base is left out."""
    report.section("manifest files")
    files = sorted((ROOT / "k8s" / "base").glob("*.yaml")) + sorted((ROOT / "k8s" / "overlays").glob("*/*.yaml"))
    for path in files:
        first = path.read_text().lstrip().splitlines()[:1]
        report.check(first and first[0].startswith("#"),
                     f"{path.relative_to(ROOT)} starts with a comment saying what it is for")
    base = ROOT / "k8s" / "base"
    listed = set(yaml.safe_load((base / "kustomization.yaml").read_text()).get("resources", []))
    for path in sorted(base.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            report.check(path.name in listed,
                         f"k8s/base/{path.name} is listed in k8s/base/kustomization.yaml resources")


def check_dockerfile(report, facts):
    report.section("Dockerfile (what the Deployment relies on)")
    entrypoint = facts["entrypoint"]
    report.check(entrypoint and json.loads(entrypoint) == [APP], f'ENTRYPOINT ["{APP}"]', f"got {entrypoint}")
    user = (facts["user"] or "").split(":")[0]
    report.check(user.isdigit() and int(user) != 0, "the runtime stage's USER is a numeric non-root uid "
                 "(the kubelet enforces runAsNonRoot only on a number)", f"USER is {facts['user']}")


def keda_validate(node_modules, docs):
    """{kind/name: error or None} for the KEDA documents, by KEDA's own models."""
    items = [d for d in docs if d.get("apiVersion", "").startswith("keda.sh/")]
    result = subprocess.run(["node", str(ROOT / "scripts" / "deploy_keda.mjs"), node_modules],
                            input=json.dumps(items), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return {"KEDA models": f"node failed: {result.stderr.strip()}"}
    return json.loads(result.stdout)


def local_roots(toml_text, env):
    """sources.local_roots as the pod sees them: the Deployment's variable, else the ConfigMap's.

    Only to know which directories to stand in for: whether the value is valid
    is check-config's to say. None when the file does not parse (check-config
    then says why).
    """
    value = env.get("AUDIO_STORE__SOURCES__LOCAL_ROOTS")
    try:
        if value is None:
            return get(tomllib.loads(toml_text), "sources", "local_roots", default=[])
        if value.strip().startswith("["):
            return tomllib.loads(f"list = {value.strip()}")["list"]
    except tomllib.TOMLDecodeError:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def check_config(report, binary, toml_text, config_name, env, roots):
    """Runs `audio-store check-config` on the ConfigMap's file with the pod's environment.

    Returns the effective configuration (check-config prints it as TOML), or
    None when the product refuses it.

    The pod's local roots are directories on its volumes, which do not exist
    here, and check-config (rightly) refuses a root that is missing. So each
    absolute root is stood in for by an empty directory of the same path under
    a temporary directory, through the variable the product defines for that
    key (AUDIO_STORE__SOURCES__LOCAL_ROOTS); a root the product would refuse
    anyway (relative, or `/`) is passed unchanged. That the roots are on the
    pod's volumes is checked against the Deployment's mounts instead.
    """
    with tempfile.TemporaryDirectory(prefix="lint-deploy-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(toml_text)
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        run_env.update(env)
        run_env["AUDIO_STORE_CONFIG"] = str(path)
        if roots is not None:
            stand_ins = []
            for root in roots:
                if isinstance(root, str) and os.path.isabs(root) and os.path.normpath(root) != "/":
                    stand_in = Path(tmp, "roots", root.lstrip("/"))
                    stand_in.mkdir(parents=True, exist_ok=True)
                    root = str(stand_in)
                stand_ins.append(json.dumps(str(root)))
            run_env["AUDIO_STORE__SOURCES__LOCAL_ROOTS"] = f"[{', '.join(stand_ins)}]"
        result = subprocess.run([binary, "check-config"], env=run_env, cwd=tmp,
                                capture_output=True, text=True, timeout=60)
    problem = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1].replace(str(path), config_name)
    if not report.check(result.returncode == 0, "`audio-store check-config` accepts the ConfigMap's file with the "
                        "Deployment's environment (local roots stood in for)", problem):
        return None
    return tomllib.loads(result.stdout)


def check_render(report, label, docs, overlay, facts, binary, keda):
    def one(kind, name=None):
        found = [d for d in docs if d.get("kind") == kind and (name is None or get(d, "metadata", "name") == name)]
        return found[0] if len(found) == 1 else None

    kinds = {d.get("kind"): d.get("apiVersion") for d in docs}
    missing = {k: v for k, v in REQUIRED_KINDS.items() if kinds.get(k) != v}
    report.check(not missing, f"renders {', '.join(f'{k} ({v})' for k, v in REQUIRED_KINDS.items())}",
                 f"missing or another apiVersion: {sorted(missing)}")
    if keda:
        for name, error in keda_validate(keda, docs).items():
            report.check(error is None, f"{name}: valid by KEDA's own models", error or "")

    # The Deployment and its container.
    dep = one("Deployment", APP)
    if not report.check(dep, f"one Deployment named {APP}"):
        return
    pod = get(dep, "spec", "template", "spec", default={})
    pod_labels = get(dep, "spec", "template", "metadata", "labels", default={})
    c = next((x for x in pod.get("containers", []) if x.get("name") == APP), None)
    if not report.check(c, f"the Deployment has a container named {APP}"):
        return
    report.check(selects(get(dep, "spec", "selector", "matchLabels"), pod_labels),
                 "the Deployment's selector matches its pod template's labels")
    report.check("command" not in c, "the container keeps the image's ENTRYPOINT (no command)")
    report.check(c.get("args", ["run"]) == ["run"], "the container runs `audio-store run`", f"args {c.get('args')}")
    run_as = get(c, "securityContext", "runAsUser", default=get(pod, "securityContext", "runAsUser"))
    report.check(str(run_as) == (facts["user"] or "").split(":")[0], "runAsUser is the Dockerfile's USER",
                 f"{run_as} vs {facts['user']}")
    http_port = next((p for p in c.get("ports", []) if p.get("name") == "http"), None)
    port = get(http_port, "containerPort")
    report.check(port, "the container has a port named http")
    report.check(str(port) in facts["expose"], f"the Dockerfile EXPOSEs the http port ({port})",
                 f"EXPOSE {facts['expose']}")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http_get = get(c, probe, "httpGet", default={})
        report.check(http_get.get("path") == path and port and container_port(c, http_get.get("port")) == port,
                     f"{probe} GETs {path} on the http port", f"got {http_get.get('path')} on {http_get.get('port')}")
    report.check(not get(c, "lifecycle", "preStop"), "no preStop hook (the worker handles SIGTERM itself)")

    # Volumes, the configuration file and the environment.
    volumes = {v.get("name"): v for v in pod.get("volumes", [])}
    mounts = {m.get("mountPath"): m for m in c.get("volumeMounts", [])}
    for m in mounts.values():
        report.check(m.get("name") in volumes,
                     f"volumeMount {m.get('mountPath')} names a volume of the pod ({m.get('name')})")
    env = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif var.get("name", "").startswith("AUDIO_STORE"):
            report.note(f"{var['name']} comes from valueFrom: check-config runs without it")
    tmp_mount = mounts.get(env.get("TMPDIR", "/tmp"))
    report.check(env.get("TMPDIR") == "/tmp" and tmp_mount and not tmp_mount.get("readOnly")
                 and "emptyDir" in volumes.get(tmp_mount.get("name"), {}),
                 "TMPDIR=/tmp is a writable emptyDir (the root filesystem is read-only)")
    config_path = env.get("AUDIO_STORE_CONFIG", "")
    report.check(config_path == facts["config"], "AUDIO_STORE_CONFIG is the Dockerfile's",
                 f"{config_path} vs {facts['config']}")
    config_dir, _, config_file = config_path.rpartition("/")
    cm_mount = mounts.get(config_dir)
    cm_name = get(volumes.get(get(cm_mount, "name")) or {}, "configMap", "name")
    cm = one("ConfigMap", cm_name) if cm_name else None
    if not report.check(cm, f"AUDIO_STORE_CONFIG ({config_path}) is in a mounted ConfigMap of the render ({cm_name})"):
        return
    report.check(get(cm_mount, "readOnly") is True, f"the ConfigMap is mounted read-only at {config_dir}")
    toml_text = get(cm, "data", config_file)
    if not report.check(toml_text is not None, f"ConfigMap {cm_name} has the key {config_file}"):
        return
    roots = local_roots(toml_text, env)
    cfg = check_config(report, binary, toml_text, f"ConfigMap {cm_name}/{config_file}", env, roots)
    if cfg is None:
        return

    # The effective configuration against the manifests.
    listen = str(get(cfg, "http", "listen", default=""))
    host, _, listen_port = listen.rpartition(":")
    report.check(listen_port == str(port) and host.strip("[]") not in ("127.0.0.1", "localhost", "::1"),
                 f"http.listen ({listen}) serves the container's http port ({port}) beyond loopback",
                 "the probes and the scraper could not reach it")
    report.check(get(cfg, "log", "format") == "json",
                 "log.format is json (one JSON object per line for the cluster's logging)")
    grace_text = get(cfg, "worker", "shutdown_grace", default="")
    grace = seconds(grace_text)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    report.check(grace is not None and isinstance(tgps, int) and tgps > grace,
                 f"terminationGracePeriodSeconds ({tgps}) > worker.shutdown_grace ({grace_text})",
                 "Kubernetes would kill the pod before in-flight messages are finished or nacked")
    for root in roots or []:
        covering = [p for p in mounts if root == p or root.startswith(p.rstrip("/") + "/")]
        m = mounts[max(covering, key=len)] if covering else {}
        why = f"it is on the mount {m.get('mountPath')}" if m else "no volumeMount of the container holds it"
        report.check(m and not m.get("readOnly") and m is not tmp_mount,
                     f"sources.local_roots {root} is on a writable volume of its own "
                     "(sources are deleted once stored)", why)

    # The ServiceAccount (Workload Identity).
    sa_name = pod.get("serviceAccountName")
    sa = one("ServiceAccount", sa_name) if sa_name else None
    report.check(sa, f"serviceAccountName {sa_name} is a ServiceAccount of the render")
    gsa = get(sa or {}, "metadata", "annotations", "iam.gke.io/gcp-service-account", default="")
    report.check(GSA.match(gsa if overlay else gsa.replace(PLACEHOLDER, "project-id")),
                 f"the ServiceAccount is annotated with a Google service account ({gsa})")

    # Service, PodDisruptionBudget, PodMonitoring.
    svc = one("Service", APP)
    if report.check(svc, f"Service {APP}"):
        ports = get(svc, "spec", "ports", default=[])
        report.check(get(svc, "spec", "type", default="ClusterIP") == "ClusterIP", "the Service is ClusterIP")
        report.check(selects(get(svc, "spec", "selector"), pod_labels), "the Service selects the Deployment's pods")
        report.check(ports and all(container_port(c, p.get("targetPort", p.get("port"))) == port for p in ports),
                     "the Service targets the http port")
    so = one("ScaledObject")
    pdb = one("PodDisruptionBudget")
    if pdb:
        spec = pdb.get("spec", {})
        report.check(selects(get(spec, "selector", "matchLabels"), pod_labels), "the PDB selects the Deployment's pods")
        report.check(("minAvailable" in spec) != ("maxUnavailable" in spec),
                     "the PDB sets one of minAvailable, maxUnavailable")
        min_replicas = get(so or {}, "spec", "minReplicaCount", default=get(dep, "spec", "replicas", default=1))
        if isinstance(spec.get("minAvailable"), int):
            report.check(spec["minAvailable"] < min_replicas,
                         f"PDB minAvailable ({spec['minAvailable']}) < minimum replicas ({min_replicas})",
                         "node drains would block")
    pm = one("PodMonitoring")
    if pm:
        report.check(selects(get(pm, "spec", "selector", "matchLabels"), pod_labels),
                     "the PodMonitoring selects the Deployment's pods")
        endpoints = get(pm, "spec", "endpoints", default=[])
        scraped = [(container_port(c, e.get("port")), e.get("path", "/metrics")) for e in endpoints]
        report.check(scraped and all(s == (port, "/metrics") for s in scraped),
                     "the PodMonitoring scrapes /metrics on the http port", f"it scrapes {scraped}")

    # The ScaledObject and its TriggerAuthentication.
    if not so:
        return
    sspec = so.get("spec", {})
    ref = sspec.get("scaleTargetRef", {})
    report.check(ref.get("name") == APP and ref.get("kind", "Deployment") == "Deployment",
                 f"the ScaledObject scales Deployment/{APP}", f"it scales {ref.get('kind')}/{ref.get('name')}")
    low, high = sspec.get("minReplicaCount", 0), sspec.get("maxReplicaCount", 100)
    report.check(isinstance(low, int) and isinstance(high, int) and 1 <= low <= high,
                 f"the ScaledObject keeps {low}..{high} replicas (at least 1: it cannot wake a worker from 0)")
    triggers = sspec.get("triggers", [])
    report.check(triggers, "the ScaledObject has triggers")
    subscription = str(get(cfg, "pubsub", "subscription", default="")).rpartition("/")[2]
    for i, trigger in enumerate(triggers):
        md = trigger.get("metadata", {})
        report.check(trigger.get("type") == "prometheus",
                     f"trigger {i} is prometheus (KEDA's gcp-pubsub is deprecated)", f"got {trigger.get('type')}")
        address = GMP_PROMQL.match(md.get("serverAddress", ""))
        report.check(address, f"trigger {i} queries Cloud Monitoring's PromQL endpoint ({md.get('serverAddress')})")
        if overlay:
            report.check(address and address.group(1) != PLACEHOLDER, f"trigger {i} names a real project")
        query = md.get("query", "")
        report.check("pubsub_googleapis_com:subscription_num_undelivered_messages" in query
                     and f'subscription_id="{subscription}"' in query,
                     f"trigger {i} queries the backlog of pubsub.subscription ({subscription})", query)
        threshold = md.get("threshold")
        report.check(isinstance(threshold, str) and re.fullmatch(r"\d+(\.\d+)?", threshold) and float(threshold) > 0,
                     f"trigger {i} threshold is a positive number as a string ({threshold!r})")
        ta_name = get(trigger, "authenticationRef", "name")
        ta = one("TriggerAuthentication", ta_name)
        report.check(ta and get(ta, "spec", "podIdentity", "provider") == "gcp",
                     f"trigger {i} authenticates with TriggerAuthentication {ta_name} (podIdentity gcp)")

    if overlay:
        report.check(PLACEHOLDER not in yaml.safe_dump_all(docs), f"no {PLACEHOLDER} placeholder left",
                     "set the project in the overlay's patches")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio-store", required=True, help="the audio-store binary, for check-config")
    parser.add_argument("--keda", help="node_modules with @kubernetes-models/keda")
    parser.add_argument("renders", nargs="+", metavar="LABEL=RENDER.yaml")
    args = parser.parse_args()

    report = Report()
    facts = dockerfile_facts()
    check_sources(report)
    check_dockerfile(report, facts)
    for item in args.renders:
        label, _, file = item.partition("=")
        report.section(f"{label} (rendered: {file})")
        docs = [d for d in yaml.safe_load_all(Path(file).read_text()) if d]
        check_render(report, label, docs, label.startswith("k8s/overlays/"), facts, args.audio_store, args.keda)
    print(f"cross-checks: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
