// Validates KEDA documents against KEDA's own CRD schemas, through the npm
// package @kubernetes-models/keda (installed by scripts/install-tools).
// Called by scripts/deploy_checks.py:
//
//   node scripts/deploy_keda.mjs NODE_MODULES < documents.json
//
// stdin: a JSON array of ScaledObject and TriggerAuthentication documents.
// stdout: a JSON object {"Kind/name": null when valid, else the error}.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const model = async (kind) => {
  const file = join(modules, "@kubernetes-models/keda/keda.sh/v1alpha1", `${kind}.js`);
  return (await import(pathToFileURL(file).href))[kind];
};

const out = {};
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  const name = `${doc.kind}/${doc.metadata?.name}`;
  try {
    const Model = await model(doc.kind);
    new Model(doc).validate();
    out[name] = null;
  } catch (error) {
    out[name] = String(error?.message ?? error);
  }
}
console.log(JSON.stringify(out));
